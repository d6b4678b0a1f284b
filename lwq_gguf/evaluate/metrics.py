"""The quality metrics of a GGUF file, one record each. Every table that shows an evaluation -
``lwq-gguf eval``, ``compare``, the model card and the benches - takes its columns and their
formats from :data:`METRICS`, so a metric is added or reformatted in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str  # the EvalResult field (and compare.json's row key)
    label: str  # its column head
    digits: int
    err: str | None = None  # the field holding its ± error
    unit: str = ""
    vs_base: bool = True  # measured against the base file (nothing for the base itself)

    def fmt(self, value: float | None, err: float | None = None) -> str:
        if value is None:
            return "-"
        text = f"{value:.{self.digits}f}{self.unit}"
        return text if err is None else f"{text} ± {err:.{self.digits}f}"

    def cell(self, result) -> str:
        """The formatted value (± its error) of an EvalResult or a compare.json row."""
        get = result.get if isinstance(result, Mapping) else lambda k: getattr(result, k, None)
        return self.fmt(get(self.key), get(self.err) if self.err else None)


METRICS = (
    Metric("ppl", "PPL", 3, err="ppl_err", vs_base=False),
    Metric("ppl_ratio", "PPL ratio", 4),
    Metric("kld_mean", "mean KLD", 5, err="kld_err"),
    Metric("kld_p99", "p99 KLD", 4),
    Metric("same_top_pct", "same top token", 2, unit="%"),
)


def metrics(*keys: str) -> tuple[Metric, ...]:
    """The metrics named, in the order given (every one when none is named)."""
    by_key = {m.key: m for m in METRICS}
    return tuple(by_key[k] for k in keys) if keys else METRICS
