"""What scoring is asked to do (:class:`ScoreConfig`) and what it measured (:class:`Scores`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from lwq_gguf import __version__
from lwq_gguf.errors import LwqError

SCORES_FORMAT, SCORES_VERSION = "lwq-gguf.scores", 2
DEVICES = ("auto", "cpu", "cuda")
# the model pass's matmuls: bf16 (fp32 accumulation; norms, softmax and the residual stream stay
# fp32, as torch.autocast runs them) or fp32; auto: bf16 where the device multiplies it natively
PRECISIONS = ("auto", "bf16", "fp32")


def default_calibration() -> Path:
    return Path(str(resources.files("lwq_gguf") / "data" / "calibration.txt"))


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """Calibration and device settings, checked when built (a missing --calib is refused here)."""

    calib: Path | None = None  # None: the packaged WikiText-2 validation excerpt
    calib_tokens: int = 4096  # LIM, ZD and the imatrix: over all of them
    fisher_tokens: int = 1024  # the Fisher (backward pass): over this many of them, in windows
    # spread evenly over the calibration tokens
    seq_len: int = 512
    device: str = "auto"  # auto | cpu | cuda
    device_map: str = "none"  # auto: pieces resident on all GPUs, as accelerate places them
    precision: str = "auto"  # the model pass's matmuls (PRECISIONS)
    # --rescore: measure again instead of reusing the score cache (lwq_gguf.score.cache)
    rescore: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.calib_tokens < 16:
            raise LwqError(f"--calib-tokens {self.calib_tokens}: use at least 16")
        if self.fisher_tokens < 16:
            raise LwqError(f"--fisher-tokens {self.fisher_tokens}: use at least 16")
        # the Fisher runs over some of the calibration tokens: at most all of them (one key)
        object.__setattr__(self, "fisher_tokens", min(self.fisher_tokens, self.calib_tokens))
        if self.device not in DEVICES:
            raise LwqError(f"--device {self.device!r}: use auto, cpu or cuda")
        if self.precision not in PRECISIONS:
            raise LwqError(f"--precision {self.precision!r}: use auto, bf16 or fp32")
        if self.device_map not in ("none", "auto"):
            raise LwqError(f"--device-map {self.device_map!r}: use none or auto")
        if self.calib is not None:
            try:
                with open(self.calib, "rb") as f:
                    f.read(1)
            except OSError as e:
                raise LwqError(f"{self.calib}: cannot read the calibration text ({e.strerror}): "
                               "pass --calib FILE with a readable text file, or leave it out for "
                               "the packaged one") from None

    @property
    def calib_file(self) -> Path:
        return self.calib or default_calibration()


def sig6(x: float) -> float:
    """6 significant digits: scores (and so plans and files) do not depend on float noise."""
    return float(f"{x:.6g}")


def _floats(v, n: int, what: str) -> tuple[float, ...]:
    if not isinstance(v, list) or len(v) != n or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
        raise ValueError(f"{what} is not a list of {n} finite numbers")
    return tuple(float(x) for x in v)


@dataclass(frozen=True)
class Scores:
    architecture: str
    n_layers: int
    lim: tuple[float, ...]  # () for an architecture lwq-gguf runs no forward pass of
    zd: tuple[float, ...]
    calib_file: str
    calib_sha256: str
    calib_tokens: int
    device: str
    model_sha256: str  # the model's content (lwq_gguf.score.cache.model_sha256): --scores is
    # accepted only for the model whose weights made it
    tool_version: str = __version__
    # strategy auto: {"tokens", "seconds", "ladder", "damage": {key: {tensor: {type: KLD}}}}
    sensitivity: dict | None = field(default=None, compare=False)
    imatrix: dict | None = field(default=None, compare=False)  # imatrix_to_dict form

    def damage(self, key: str) -> dict | None:
        return (self.sensitivity or {}).get("damage", {}).get(key)

    def to_json(self) -> str:
        d = {"format": SCORES_FORMAT, "version": SCORES_VERSION, **asdict(self)}
        d["lim"], d["zd"] = list(self.lim), list(self.zd)
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "scores") -> Scores:
        """Parse and check a scores JSON; anything else is one LwqError naming ``source``."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise ValueError(f"a JSON {type(d).__name__}, not an object")
            if d.get("format") != SCORES_FORMAT or d.get("version") != SCORES_VERSION:
                raise ValueError(f"not a version-{SCORES_VERSION} lwq-gguf scores file")
            n = d["n_layers"]
            if not isinstance(n, int) or n < 1:
                raise ValueError("n_layers is not a positive integer")
            for k in ("architecture", "calib_file", "calib_sha256", "device", "model_sha256"):
                if not isinstance(d[k], str):
                    raise ValueError(f"{k} is not a string")
            if not isinstance(d["calib_tokens"], int):
                raise ValueError("calib_tokens is not an integer")
            _check_sensitivity(d.get("sensitivity"))
            if d.get("imatrix") is not None:
                _check_imatrix(d["imatrix"])
            lim = () if d["lim"] == [] else _floats(d["lim"], n, "lim")  # []: no forward pass
            return cls(d["architecture"], n, lim, _floats(d["zd"], n, "zd"),
                       d["calib_file"], d["calib_sha256"], d["calib_tokens"], d["device"],
                       d["model_sha256"], str(d.get("tool_version", "?")), d.get("sensitivity"),
                       d.get("imatrix"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LwqError(f"{source}: corrupt or outdated scores file ({e}): make it again with "
                           "`lwq-gguf score`") from None

    def check_model(self, model, model_sha256: str, source: str) -> None:
        """Refuse scores measured on another model (another architecture, depth or weights)."""
        if (self.architecture, self.n_layers) != (model.architecture, model.n_layers):
            raise LwqError(f"{source}: scores are for a {self.n_layers}-layer {self.architecture}, "
                           f"not {model.path} ({model.n_layers}-layer {model.architecture}): "
                           "score this model")
        if self.model_sha256 != model_sha256:
            raise LwqError(f"{source}: scores were measured on other weights than {model.path} "
                           "(content digest differs): score this model with `lwq-gguf score`")


def _check_sensitivity(s) -> None:
    if s is None:
        return
    if not isinstance(s, dict) or not isinstance(s.get("ladder"), list) \
            or not isinstance(s.get("damage"), dict):
        raise ValueError("sensitivity is not {ladder: [...], damage: {...}}")
    for key, table in s["damage"].items():
        if not isinstance(table, dict) or not all(
                isinstance(row, dict) and all(isinstance(v, (int, float)) and math.isfinite(v)
                                              for v in row.values()) for row in table.values()):
            raise ValueError(f"sensitivity table {key!r} is not {{tensor: {{type: number}}}}")


def _check_imatrix(m) -> None:
    if not isinstance(m, dict) or not isinstance(m.get("entries"), dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[1], str)
            for v in m["entries"].values()):
        raise ValueError("imatrix is not {entries: {name: [counts, base64]}}")
    for k in ("dataset", "chunk_size", "chunks"):
        if k not in m:
            raise ValueError(f"imatrix has no {k}")
