"""Plan: a bit budget (+ layer scores or sensitivity tables) -> one quantization type per tensor.

The budget is llama.cpp's BPW over the whole file: sum(tensor bytes) * 8 / sum(tensor elements),
every tensor counted (embeddings, output and the F32 norms included) with its real block size.

Method (the paper's, at tensor granularity at the boundary): the ladder gives levels L0 < L1 < ...
Every planned tensor at level j costs the bytes of the type it can really take at that level
(``quant.types.legal_type``: a 576-wide row cannot hold Q4_K, so it is counted as llama.cpp's Q5_0
fallback). Token embedding and output (``auto`` policy) are placed first, at the upper of the two
adjacent levels whose all-tensor BPW brackets the target (else at the nearest level that still
lets the layers reach it). For the layer tensors, the two adjacent levels that bracket the rest of
the budget are chosen; walking them in priority order (layers from most to least important, inside
a layer attn_v, ffn_down, attn_output, attn_k, attn_q, ffn_gate, ffn_up), each is raised to the
upper level while that stays within the budget. Every tensor kind therefore gets its upper type
in a prefix of the importance ranking.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from lwq_gguf import __version__
from lwq_gguf.errors import PlanError
from lwq_gguf.plan.budget import dense_budget, gib, is_dense
from lwq_gguf.plan.knapsack import min_damage, min_damage_split
from lwq_gguf.quant.tensors import GGUFTensor, tensor_nbytes
from lwq_gguf.quant.types import (DEFAULT_ENCODER, ENCODERS, QUANT_TYPES, default_ladder,
                                  has_fallback, legal_type, parse_ladder, quant_type,
                                  usable_ladder)

TOLERANCE = 0.02
STRATEGIES = ("auto", "lim", "zd", "random")
PLAN_FORMAT, PLAN_VERSION = "lwq-gguf.plan", 1
_KIND_PRIORITY = ("attn_v", "ffn_down", "attn_output", "attn_k", "attn_q", "ffn_gate", "ffn_up")


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
                raise PlanError(f"bad --tensor-type pattern {pattern!r}: {e}")


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

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(ty, t.shape) for t, ty in zip(self.tensors, self.types))

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
            "basis": self.basis,
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
            c = d["config"]
            cfg = PlanConfig(avg_bits=float(c["avg_bits"]), ladder=tuple(c["ladder"]),
                             strategy=c["strategy"], seed=int(c["seed"]),
                             token_embedding_type=c["token_embedding_type"],
                             output_tensor_type=c["output_tensor_type"],
                             overrides=tuple((str(p), str(t)) for p, t in c["overrides"]),
                             # plans from before the lwq encoder existed were written by ggml's
                             encoder=c.get("encoder", "ggml"),
                             dense_bytes=c.get("dense_bytes"), dense_bits=c.get("dense_bits"))
            tensors = tuple(GGUFTensor(str(r["name"]), tuple(int(x) for x in r["shape"]),
                                       str(r["src_type"])) for r in d["tensors"])
            types = tuple(quant_type(r["type"]).name for r in d["tensors"])
            if not tensors:
                raise ValueError("no tensors")
            return cls(cfg, tensors, types, tuple(int(i) for i in d["layer_order"]),
                       tuple(str(t) for t in d["pair"]), str(d.get("basis", "")),
                       str(d.get("tool_version", "?")))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PlanError(f"{source}: corrupt plan file ({e}): make a new one with "
                            "`lwq-gguf plan`") from None

    def tensor_type_file(self) -> str:
        """``llama-quantize --tensor-type-file`` lines: one exact pattern per quantized tensor."""
        return "".join(f"^{re.escape(t.name)}$={ty}\n"
                       for t, ty in zip(self.tensors, self.types) if t.quantizable)


def layer_order(strategy: str, n_layers: int, lim: Sequence[float] | None,
                zd: Sequence[float] | None, seed: int = 0) -> tuple[int, ...]:
    """Layers from most to least important under ``strategy``."""
    if strategy == "random":
        order = list(range(n_layers))
        random.Random(seed).shuffle(order)
        return tuple(order)
    score = lim if strategy == "lim" else zd
    if strategy == "lim" and lim is not None and len(lim) == 0:
        raise PlanError("strategy lim needs a forward pass, which lwq-gguf does not run for this "
                        "architecture: use --strategy auto (weight error) or zd")
    if score is None or len(score) != n_layers:
        raise PlanError(f"strategy {strategy!r} needs {strategy.upper()} scores for {n_layers} "
                        "layers: run `lwq-gguf score` on this model (or pass --strategy random)")
    return tuple(sorted(range(n_layers), key=lambda i: (-score[i], i)))


def _fixed_type(t: GGUFTensor, cfg: PlanConfig) -> str | None:
    """The type a tensor gets regardless of the budget, or None when the planner decides."""
    if not t.quantizable:
        return t.src_type
    for pattern, ty in cfg.overrides:
        if re.search(pattern, t.name):
            return _legal_fixed(ty, t, f"--tensor-type {pattern}={ty}")
    policy = {"token_embd.weight": cfg.token_embedding_type,
              "output.weight": cfg.output_tensor_type}.get(t.name, "auto")
    return None if policy == "auto" else _legal_fixed(policy, t, f"the type {policy}")


def _legal_fixed(ty: str, t: GGUFTensor, asked: str) -> str:
    legal = legal_type(ty, t.shape[0])
    if legal is None:
        raise PlanError(f"{asked}: {t.name} has rows of {t.shape[0]} weights, which {ty} cannot "
                        "hold (llama-quantize has no fallback for it): choose another type")
    return legal


def _candidates(t: GGUFTensor, ladder: Sequence[str]) -> list[str]:
    """The types a tensor can really be written in for ``ladder``, smallest first."""
    return sorted({ty for q in ladder if (ty := legal_type(q, t.shape[0])) is not None},
                  key=lambda ty: (tensor_nbytes(ty, t.shape), ty))


_EMBED = ("token_embd.weight", "output.weight")


def _priority(t: GGUFTensor, rank: dict[int, int]) -> tuple:
    if t.layer is None:
        return (0, 0, 0, t.name)
    k = t.kind
    kp = _KIND_PRIORITY.index(k) if k in _KIND_PRIORITY else len(_KIND_PRIORITY)
    return (1, rank[t.layer], kp, t.name)


def _two_level(units: list[int], levels: list[list[str]], shapes: list[tuple], budget: float
               ) -> tuple[dict[int, str], int]:
    """Types for ``units`` (in priority order) whose bits come closest to ``budget``.

    All units start at the highest level whose total fits; then each, in priority order, is raised
    one level while the budget allows; finally one more raise if it lands closer to the budget.
    Returns (types, level index of the lower of the two levels used).
    """
    def cost(i: int, j: int) -> int:
        return tensor_nbytes(levels[i][j], shapes[i]) * 8

    n_levels = len(levels[units[0]]) if units else 1
    totals = [sum(cost(i, j) for i in units) for j in range(n_levels)]
    j = max([k for k in range(n_levels) if totals[k] <= budget] or [0])
    hi = min(j + 1, n_levels - 1)
    chosen = {i: levels[i][j] for i in units}
    bits, skipped = totals[j], []
    for i in units:
        step = cost(i, hi) - cost(i, j)
        if step <= 0:
            continue
        if bits + step <= budget:
            chosen[i] = levels[i][hi]
            bits += step
        else:
            skipped.append((i, step))
    if skipped:
        i, step = min(skipped, key=lambda s: abs(bits + s[1] - budget))
        if abs(bits + step - budget) < abs(bits - budget):
            chosen[i] = levels[i][hi]
    return chosen, j


def _check_reach(cfg: PlanConfig, lo_bpw: float, hi_bpw: float) -> None:
    if not lo_bpw - TOLERANCE <= cfg.avg_bits <= hi_bpw + TOLERANCE:
        raise PlanError(
            f"--avg-bits {cfg.avg_bits:g} is outside what ladder {','.join(cfg.ladder)} reaches on "
            f"this model: {lo_bpw:.3f} to {hi_bpw:.3f} BPW (whole file, embeddings included): pick "
            "a target in that range or widen the ladder")


def check_reach(tensors: Sequence[GGUFTensor], cfg: PlanConfig, imatrix: bool = True) -> None:
    """Refuse a target the ladder cannot reach on these tensors (before any slow work), and a
    non-expert limit (--dense-size/--dense-bits) that cannot be met with it. ``imatrix``: whether
    the types that need an importance matrix can be used."""
    total = sum(t.numel for t in tensors)
    lo = hi = dense_lo = dense_hi = 0
    ladder = usable_ladder(cfg.ladder, imatrix)
    for t in tensors:
        fixed = _fixed_type(t, cfg)
        sizes = [tensor_nbytes(ty, t.shape)
                 for ty in ([fixed] if fixed is not None else _candidates(t, ladder))]
        if not sizes:
            raise PlanError(f"{t.name}: no type of --ladder {','.join(cfg.ladder)} can hold its "
                            f"rows of {t.shape[0]} weights: add e.g. q8_0 to the ladder")
        lo, hi = lo + min(sizes), hi + max(sizes)
        if is_dense(t):
            dense_lo, dense_hi = dense_lo + min(sizes), dense_hi + max(sizes)
    _check_reach(cfg, lo * 8 / total, hi * 8 / total)
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


def _plan_auto(tensors: tuple[GGUFTensor, ...], order: tuple[int, ...], cfg: PlanConfig,
               damage: Mapping[str, Mapping[str, float]] | None) -> Plan:
    """Least total expected KLD within the byte budget (multiple-choice knapsack, exact DP)."""
    if damage is None:
        raise PlanError("strategy auto needs the sensitivity analysis (made by `lwq-gguf score` "
                        "or on the fly by plan/convert): re-score, or pass --strategy lim")
    total = sum(t.numel for t in tensors)
    fixed = [_fixed_type(t, cfg) for t in tensors]
    fixed_bytes = sum(tensor_nbytes(ty, t.shape) for t, ty in zip(tensors, fixed) if ty)
    free = [i for i, ty in enumerate(fixed) if ty is None]
    choices, options = [], []
    for i in free:
        t = tensors[i]
        d = damage.get(t.name, {})
        lost = [ty for ty in _candidates(t, cfg.ladder)
                if ty not in d and not QUANT_TYPES[ty].needs_imatrix]
        if lost:
            raise PlanError(f"the sensitivity analysis has no damage for {t.name} as "
                            f"{lost[0]}: re-score with this ladder")
        # (a type that needs an importance matrix is measured only where there is one)
        types = [ty for ty in _candidates(t, cfg.ladder) if ty in d]
        if not types:
            raise PlanError(f"{t.name}: none of --ladder {','.join(cfg.ladder)} can be written "
                            "without an importance matrix: add K-quants (--ladder k,...) or "
                            "use --imatrix auto")
        # only the types no cheaper one beats (the knapsack would never take the others)
        kept, floor = [], float("inf")
        for ty in types:  # smallest first
            if d[ty] < floor:
                kept.append(ty)
                floor = d[ty]
        choices.append(kept)
        options.append([(tensor_nbytes(ty, t.shape), d[ty]) for ty in kept])
    _check_reach(cfg, (fixed_bytes + sum(o[0][0] for o in options)) * 8 / total,
                 (fixed_bytes + sum(o[-1][0] for o in options)) * 8 / total)
    def size(bpw: float) -> int:
        return int(bpw * total / 8) - fixed_bytes

    limit = dense_budget(tensors, cfg.dense_bytes, cfg.dense_bits)
    if limit is None:
        # never above the target when the tensors allow it, else anywhere within the tolerance
        pick = min_damage(options, size(cfg.avg_bits), size(cfg.avg_bits - TOLERANCE / 2))
        if pick is None or sum(o[j][0] for o, j in zip(options, pick)) < size(
                cfg.avg_bits - TOLERANCE):
            pick = min_damage(options, size(cfg.avg_bits + TOLERANCE),
                              size(cfg.avg_bits - TOLERANCE)) or [0] * len(options)
    else:
        check_reach(tensors, cfg)
        fixed_dense = sum(tensor_nbytes(ty, t.shape) for t, ty in zip(tensors, fixed)
                          if ty and is_dense(t))
        pick = min_damage_split(options, [is_dense(tensors[i]) for i in free],
                                size(cfg.avg_bits), limit - fixed_dense,
                                size(cfg.avg_bits - TOLERANCE / 2)) or [0] * len(options)
    types = list(fixed)
    for k, i in enumerate(free):
        types[i] = choices[k][pick[k]]
    used = sorted({choices[k][pick[k]] for k in range(len(free))} or {"f16"},
                  key=lambda ty: QUANT_TYPES[ty].bpw)
    plan = Plan(cfg, tensors, tuple(types), order, (used[0], used[-1]))
    if abs(plan.bpw() - cfg.avg_bits) > TOLERANCE:
        raise PlanError(f"--avg-bits {cfg.avg_bits:g}: the closest this model's tensors allow is "
                        f"{plan.bpw():.3f} BPW: choose a nearby target")
    return plan


def make_plan(tensors: Sequence[GGUFTensor], n_layers: int, cfg: PlanConfig,
              lim: Sequence[float] | None = None, zd: Sequence[float] | None = None,
              damage: Mapping[str, Mapping[str, float]] | None = None) -> Plan:
    """Plan every tensor; see the module docstring for the method.

    Embedding and output under the ``auto`` policy are placed first (each on its own): at the
    upper of the two levels the whole model would use, else the nearest levels that still let the
    layers reach the target (output.weight kept higher when only one can be).
    """
    tensors = tuple(tensors)
    if cfg.strategy == "auto":
        order = layer_order("lim", n_layers, lim, zd) if lim else tuple(range(n_layers))
        return _plan_auto(tensors, order, cfg, damage)
    order = layer_order(cfg.strategy, n_layers, lim, zd, cfg.seed)
    rank = {layer: i for i, layer in enumerate(order)}
    total_elems = sum(t.numel for t in tensors)
    fixed = [_fixed_type(t, cfg) for t in tensors]
    fixed_bits = sum(tensor_nbytes(ty, t.shape) * 8 for t, ty in zip(tensors, fixed) if ty)
    free = [i for i, ty in enumerate(fixed) if ty is None]
    emb = [i for i in free if tensors[i].name in _EMBED]
    units = sorted((i for i in free if i not in emb), key=lambda i: _priority(tensors[i], rank))
    levels = [[legal_type(q, t.shape[0]) for q in cfg.ladder] for t in tensors]
    shapes = [t.shape for t in tensors]
    n_levels = len(cfg.ladder)

    all_bpw = [(fixed_bits + sum(tensor_nbytes(levels[i][j], shapes[i]) * 8 for i in free))
               / total_elems for j in range(n_levels)]  # every free tensor at level j
    target = cfg.avg_bits
    _check_reach(cfg, all_bpw[0], all_bpw[-1])
    j = max([k for k in range(n_levels) if all_bpw[k] <= target] or [0])
    hi = min(j + 1, n_levels - 1)
    prefs = [hi] + list(range(j, -1, -1)) + list(range(hi + 1, n_levels))
    emb.sort(key=lambda i: tensors[i].name != "output.weight")  # output first: it matters more
    combos = sorted(itertools.product(range(len(prefs)), repeat=len(emb)), key=lambda c: (sum(c), c))
    best = None
    for combo in combos:
        e_level = {i: prefs[k] for i, k in zip(emb, combo)}
        emb_bits = sum(tensor_nbytes(levels[i][e], shapes[i]) * 8 for i, e in e_level.items())
        chosen, lo = _two_level(units, levels, shapes, target * total_elems - fixed_bits - emb_bits)
        chosen.update({i: levels[i][e] for i, e in e_level.items()})
        types = tuple(fixed[i] or chosen[i] for i in range(len(tensors)))
        plan = Plan(cfg, tensors, types, order, (cfg.ladder[lo], cfg.ladder[min(lo + 1, n_levels - 1)]))
        if abs(plan.bpw() - target) <= TOLERANCE:
            return plan
        if best is None or abs(plan.bpw() - target) < abs(best.bpw() - target):
            best = plan
    raise PlanError(f"--avg-bits {target:g}: the closest this model's tensors allow is "
                    f"{best.bpw():.3f} BPW (tensor steps too coarse): choose a nearby target")
