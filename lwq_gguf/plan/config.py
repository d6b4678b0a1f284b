"""What a plan is: the settings asked for (:class:`PlanConfig`), the plan itself (:class:`Plan`,
versioned JSON), and the rules every strategy shares - which tensors are fixed (overrides,
embedding/output policy), which types a tensor can really take, and whether a target is in reach.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

from lwq_gguf import __version__
from lwq_gguf.errors import PlanError
from lwq_gguf.plan.budget import dense_budget, gib, is_dense
from lwq_gguf.model.inventory import GGUFTensor
from lwq_gguf.quant.tensors import tensor_nbytes
from lwq_gguf.quant.types import (DEFAULT_ENCODER, ENCODERS, QUANT_TYPES, default_ladder,
                                  has_fallback, legal_type, legal_types, parse_ladder,
                                  quant_type, usable_ladder)

TOLERANCE = 0.02
STRATEGIES = ("auto", "lim", "zd", "random")
PLAN_FORMAT, PLAN_VERSION = "lwq-gguf.plan", 1


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """What the user asked the planner for; checked when built."""

    avg_bits: float
    ladder: tuple[str, ...] = ()  # () = the strategy's default (quants.default_ladder)
    strategy: str = "auto"
    seed: int = 0
    token_embedding_type: str = "auto"  # "auto" = planned first, or a type name
    output_tensor_type: str = "auto"
    overrides: tuple[tuple[str, str], ...] = ()  # (regex, type): first match wins, like llama-quantize
    encoder: str = DEFAULT_ENCODER  # who encodes the blocks: lwq (own Q4_K) or ggml (llama-quantize's)
    # a mixture-of-experts model's non-expert part (plan.budget): at most this many bytes, or
    # this many bits per weight over its tensors
    dense_bytes: int | None = None
    dense_bits: float | None = None

    def __post_init__(self):
        if not isinstance(self.avg_bits, (int, float)) or not 1 <= self.avg_bits <= 32:
            raise PlanError(f"--avg-bits {self.avg_bits!r}: give bits per weight between 1 and 32, "
                            "e.g. --avg-bits 4.5")
        if self.strategy not in STRATEGIES:
            raise PlanError(f"unknown strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.encoder not in ENCODERS:
            raise PlanError(f"unknown encoder {self.encoder!r}: use one of {', '.join(ENCODERS)}")
        object.__setattr__(self, "ladder", parse_ladder(self.ladder or default_ladder(self.strategy)))
        odd = [q for q in self.ladder if QUANT_TYPES[q].needs_imatrix or not has_fallback(q)]
        if odd and self.strategy != "auto":
            raise PlanError(f"--strategy {self.strategy} walks types every tensor can take; "
                            f"{', '.join(odd)} need an importance matrix or fit only some rows: "
                            "drop them from --ladder, or use --strategy auto")
        if self.dense_bytes is not None and self.dense_bits is not None:
            raise PlanError("--dense-size and --dense-bits both bound the non-expert part: give one")
        if self.dense_bits is not None and not 1 <= self.dense_bits <= 32:
            raise PlanError(f"--dense-bits {self.dense_bits!r}: give bits per weight between 1 "
                            "and 32, e.g. --dense-bits 5")
        if (self.dense_bytes is not None or self.dense_bits is not None) \
                and self.strategy != "auto":
            raise PlanError("--dense-size/--dense-bits are planned by --strategy auto: drop "
                            f"--strategy {self.strategy}")
        for t in (self.token_embedding_type, self.output_tensor_type):
            if t != "auto":
                quant_type(t)
        for pattern, t in self.overrides:
            quant_type(t)
            try:
                re.compile(pattern)
            except re.error as e:
                raise PlanError(f"bad --tensor-type pattern {pattern!r}: {e}") from None


def parse_override(spec: str) -> tuple[str, str]:
    """'REGEX=TYPE' as llama-quantize --tensor-type takes it."""
    pattern, sep, t = spec.rpartition("=")
    if not sep or not pattern:
        raise PlanError(f"bad --tensor-type {spec!r}: write it as REGEX=TYPE, e.g. attn_v=q6_k")
    return pattern.lower(), quant_type(t).name


@dataclass(frozen=True)
class Plan:
    config: PlanConfig
    tensors: tuple[GGUFTensor, ...]
    types: tuple[str, ...]  # the type each tensor has in the output file
    layer_order: tuple[int, ...]  # most important first
    pair: tuple[str, str]
    basis: str = ""  # strategy auto: what the damage tables measure (score.weights.BASIS_*)
    # the llama-quantize preset this plan reproduces (plan.mixes.mix_plan): its file is
    # llama-quantize's own, byte for byte (the preset's file type, no lwq.* keys)
    mix: str = ""
    tool_version: str = field(default=__version__, compare=False)

    def type_of(self, name: str) -> str:
        return self.types[[t.name for t in self.tensors].index(name)]

    def bpw(self, layers_only: bool = False) -> float:
        bits = elems = 0
        for t, ty in zip(self.tensors, self.types):
            if layers_only and t.layer is None:
                continue
            bits += tensor_nbytes(ty, t.shape) * 8
            elems += t.numel
        return bits / elems

    def tensor_bytes(self) -> list[int]:
        """Each tensor's bytes in the file, in plan order."""
        return [tensor_nbytes(ty, t.shape) for t, ty in zip(self.tensors, self.types)]

    @property
    def nbytes(self) -> int:
        return sum(self.tensor_bytes())

    @property
    def dense_nbytes(self) -> int:
        """Bytes of every tensor but the routed experts (plan.budget.is_dense)."""
        return sum(tensor_nbytes(ty, t.shape) for t, ty in zip(self.tensors, self.types)
                   if is_dense(t))

    def to_dict(self) -> dict:
        cfg = asdict(self.config)
        cfg["overrides"] = [list(o) for o in self.config.overrides]
        return {
            "format": PLAN_FORMAT, "version": PLAN_VERSION, "tool_version": self.tool_version,
            "config": cfg, "layer_order": list(self.layer_order), "pair": list(self.pair),
            "basis": self.basis, **({"mix": self.mix} if self.mix else {}),
            "summary": {"bpw": round(self.bpw(), 4), "bpw_layers": round(self.bpw(True), 4),
                        "bytes": self.nbytes, "elements": sum(t.numel for t in self.tensors)},
            "tensors": [{"name": t.name, "shape": list(t.shape), "src_type": t.src_type, "type": ty}
                        for t, ty in zip(self.tensors, self.types)],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        """Parse and check a plan JSON; anything else is one PlanError naming ``source``."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT \
                    or d.get("version") != PLAN_VERSION:
                raise PlanError(f"{source}: not a version-{PLAN_VERSION} lwq-gguf plan: "
                                "make it with `lwq-gguf plan`")
            # every field the file has, lists back to tuples; a plan from before the lwq
            # encoder existed was written by ggml's
            c = {"encoder": "ggml", **d["config"]}
            cfg = PlanConfig(**{f.name: _tuples(c[f.name]) for f in fields(PlanConfig)
                                if f.name in c})
            tensors = tuple(GGUFTensor(str(r["name"]), tuple(int(x) for x in r["shape"]),
                                       str(r["src_type"])) for r in d["tensors"])
            types = tuple(quant_type(r["type"]).name for r in d["tensors"])
            if not tensors:
                raise ValueError("no tensors")
            return cls(cfg, tensors, types, tuple(int(i) for i in d["layer_order"]),
                       (str(d["pair"][0]), str(d["pair"][1])), str(d.get("basis", "")),
                       str(d.get("mix", "")), str(d.get("tool_version", "?")))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PlanError(f"{source}: corrupt plan file ({e}): make a new one with "
                            "`lwq-gguf plan`") from None

    def tensor_type_file(self) -> str:
        """``llama-quantize --tensor-type-file`` lines: one exact pattern per quantized tensor."""
        return "".join(f"^{re.escape(t.name)}$={ty}\n"
                       for t, ty in zip(self.tensors, self.types) if t.quantizable)


def _tuples(v):
    """JSON lists back to the tuples of a frozen config (nested)."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def fixed_type(t: GGUFTensor, cfg: PlanConfig) -> str | None:
    """The type a tensor gets regardless of the budget, or None when the planner decides."""
    if not t.quantizable:
        return t.src_type
    for pattern, ty in cfg.overrides:
        if re.search(pattern, t.name):
            return legal_fixed(ty, t, f"--tensor-type {pattern}={ty}")
    policy = {"token_embd.weight": cfg.token_embedding_type,
              "output.weight": cfg.output_tensor_type}.get(t.name, "auto")
    return None if policy == "auto" else legal_fixed(policy, t, f"the type {policy}")


def legal_fixed(ty: str, t: GGUFTensor, asked: str) -> str:
    legal = legal_type(ty, t.shape[0])
    if legal is None:
        raise PlanError(f"{asked}: {t.name} has rows of {t.shape[0]} weights, which {ty} cannot "
                        "hold (llama-quantize has no fallback for it): choose another type")
    return legal


def candidates(t: GGUFTensor, ladder: Sequence[str]) -> list[str]:
    """The types a tensor can really be written in for ``ladder``, smallest first."""
    return sorted(legal_types(tuple(ladder), t.shape[0]),
                  key=lambda ty: (tensor_nbytes(ty, t.shape), ty))


def check_range(cfg: PlanConfig, lo_bpw: float, hi_bpw: float) -> None:
    if not lo_bpw - TOLERANCE <= cfg.avg_bits <= hi_bpw + TOLERANCE:
        raise PlanError(
            f"--avg-bits {cfg.avg_bits:g} is outside what ladder {','.join(cfg.ladder)} reaches on "
            f"this model: {lo_bpw:.3f} to {hi_bpw:.3f} BPW (whole file, embeddings included): pick "
            "a target in that range or widen the ladder")


def _reach(tensors: Sequence[GGUFTensor], cfg: PlanConfig, imatrix: bool
           ) -> tuple[int, int, int, int]:
    """Tensor bytes at the least and the most the ladder allows: of the whole, of the non-expert
    part."""
    lo = hi = dense_lo = dense_hi = 0
    ladder = usable_ladder(cfg.ladder, imatrix)
    if not ladder:
        raise PlanError(f"--ladder {','.join(cfg.ladder)}: every one of these types needs an "
                        "importance matrix: use --imatrix auto (or a llama-imatrix file), or add "
                        "types such as q2_k,q4_k")
    for t in tensors:
        fixed = fixed_type(t, cfg)
        sizes = [tensor_nbytes(ty, t.shape)
                 for ty in ([fixed] if fixed is not None else candidates(t, ladder))]
        if not sizes:
            raise PlanError(f"{t.name}: no type of --ladder {','.join(cfg.ladder)} can hold its "
                            f"rows of {t.shape[0]} weights: add e.g. q8_0 to the ladder")
        lo, hi = lo + min(sizes), hi + max(sizes)
        if is_dense(t):
            dense_lo, dense_hi = dense_lo + min(sizes), dense_hi + max(sizes)
    return lo, hi, dense_lo, dense_hi


def reach_bytes(tensors: Sequence[GGUFTensor], cfg: PlanConfig, imatrix: bool = True
                ) -> tuple[int, int]:
    """(least, most) tensor bytes the ladder allows on these tensors."""
    return _reach(tensors, cfg, imatrix)[:2]


def check_reach(tensors: Sequence[GGUFTensor], cfg: PlanConfig, imatrix: bool = True) -> None:
    """Refuse a target the ladder cannot reach on these tensors (before any slow work), and a
    non-expert limit (--dense-size/--dense-bits) that cannot be met with it. ``imatrix``: whether
    the types that need an importance matrix can be used."""
    total = sum(t.numel for t in tensors)
    lo, hi, dense_lo, dense_hi = _reach(tensors, cfg, imatrix)
    check_range(cfg, lo * 8 / total, hi * 8 / total)
    limit = dense_budget(tensors, cfg.dense_bytes, cfg.dense_bits)
    if limit is None:
        return
    if limit < dense_lo:
        raise PlanError(f"the non-expert part cannot fit in {gib(limit)}: with ladder "
                        f"{','.join(cfg.ladder)} it takes {gib(dense_lo)} to {gib(dense_hi)}: "
                        "raise --dense-size/--dense-bits or add lower types to the ladder")
    top = (hi - dense_hi + min(dense_hi, limit)) * 8 / total
    if cfg.avg_bits > top + TOLERANCE:
        raise PlanError(f"--avg-bits {cfg.avg_bits:g}: with the non-expert part within "
                        f"{gib(limit)}, this model reaches {lo * 8 / total:.3f} to {top:.3f} BPW: "
                        "lower --avg-bits or raise --dense-size/--dense-bits")

