"""Plan: a bit budget (+ layer scores or sensitivity tables) -> one quantization type per tensor.

The budget is llama.cpp's BPW over the whole file: sum(tensor bytes) * 8 / sum(tensor elements),
every tensor counted (embeddings, output and the F32 norms included) with its real block size;
a tensor is counted in the type it really gets (``quant.types.legal_type``: a 576-wide row cannot
hold Q4_K, so it is counted as llama.cpp's Q5_0 fallback).

``--strategy auto`` (here): the least total expected KLD within the budget, a multiple-choice
knapsack over the measured damage of every candidate type. The paper's strategies (lim, zd,
random): :mod:`lwq_gguf.plan.paper`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from lwq_gguf.errors import PlanError
from lwq_gguf.plan.budget import dense_budget, is_dense
from lwq_gguf.plan.config import (PLAN_FORMAT, PLAN_VERSION, STRATEGIES, TOLERANCE, Plan,
                                  PlanConfig, candidates, check_range, check_reach, fixed_type,
                                  parse_override)
from lwq_gguf.plan.knapsack import min_damage, min_damage_split
from lwq_gguf.plan.paper import plan_two_level
from lwq_gguf.model.inventory import GGUFTensor
from lwq_gguf.quant.tensors import tensor_nbytes
from lwq_gguf.quant.types import QUANT_TYPES

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "STRATEGIES", "TOLERANCE", "Plan", "PlanConfig",
           "check_reach", "layer_order", "make_plan", "parse_override"]


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


def _plan_auto(tensors: tuple[GGUFTensor, ...], order: tuple[int, ...], cfg: PlanConfig,
               damage: Mapping[str, Mapping[str, float]] | None) -> Plan:
    """Least total expected KLD within the byte budget (multiple-choice knapsack, exact DP)."""
    if damage is None:
        raise PlanError("strategy auto needs the sensitivity analysis (made by `lwq-gguf score` "
                        "or on the fly by plan/convert): re-score, or pass --strategy lim")
    total = sum(t.numel for t in tensors)
    fixed = [fixed_type(t, cfg) for t in tensors]
    fixed_bytes = sum(tensor_nbytes(ty, t.shape) for t, ty in zip(tensors, fixed) if ty)
    free = [i for i, ty in enumerate(fixed) if ty is None]
    choices, options = [], []
    for i in free:
        t = tensors[i]
        d = damage.get(t.name, {})
        lost = [ty for ty in candidates(t, cfg.ladder)
                if ty not in d and not QUANT_TYPES[ty].needs_imatrix]
        if lost:
            raise PlanError(f"the sensitivity analysis has no damage for {t.name} as "
                            f"{lost[0]}: re-score with this ladder")
        # (a type that needs an importance matrix is measured only where there is one)
        types = [ty for ty in candidates(t, cfg.ladder) if ty in d]
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
    check_range(cfg, (fixed_bytes + sum(o[0][0] for o in options)) * 8 / total,
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
        least = min_damage(options, size(cfg.avg_bits))
    else:
        check_reach(tensors, cfg)
        fixed_dense = sum(tensor_nbytes(ty, t.shape) for t, ty in zip(tensors, fixed)
                          if ty and is_dense(t))
        pick = min_damage_split(options, [is_dense(tensors[i]) for i in free],
                                size(cfg.avg_bits), limit - fixed_dense,
                                size(cfg.avg_bits - TOLERANCE / 2)) or [0] * len(options)
        least = min_damage_split(options, [is_dense(tensors[i]) for i in free],
                                 size(cfg.avg_bits), limit - fixed_dense)
    # A file nearer the target that has more estimated damage than the least-damage file within
    # it is never written: when landing there costs damage (a tensor's larger types add damage -
    # weights on a smaller type's grid - or one large tensor's steps leave a gap, e.g. a 262k-row
    # embedding), the smaller file wins; the summary shows its BPW beside the target
    if least is not None and _damage(options, least) < _damage(options, pick) * (1 - 1e-9):
        pick = least
    types = [ty or "" for ty in fixed]  # (every free one is chosen below)
    for k, i in enumerate(free):
        types[i] = choices[k][pick[k]]
    used = sorted({choices[k][pick[k]] for k in range(len(free))} or {"f16"},
                  key=lambda ty: QUANT_TYPES[ty].bpw)
    plan = Plan(cfg, tensors, tuple(types), order, (used[0], used[-1]))
    if plan.bpw() > cfg.avg_bits + TOLERANCE:
        raise PlanError(f"--avg-bits {cfg.avg_bits:g}: the closest this model's tensors allow is "
                        f"{plan.bpw():.3f} BPW: choose a nearby target")
    return plan


def _damage(options: Sequence[Sequence[tuple[int, float]]], pick: Sequence[int]) -> float:
    return sum(o[j][1] for o, j in zip(options, pick))


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
    return plan_two_level(tensors, cfg, layer_order(cfg.strategy, n_layers, lim, zd, cfg.seed))
