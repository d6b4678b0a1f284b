"""The paper's strategies (lim, zd, random): a two-level walk down a layer ranking.

The ladder gives levels L0 < L1 < ... Token embedding and output (``auto`` policy) are placed
first, at the upper of the two adjacent levels whose all-tensor BPW brackets the target (else at
the nearest level that still lets the layers reach it; output.weight kept higher when only one
can be). For the layer tensors, the two adjacent levels that bracket the rest of the budget are
chosen; walking them in priority order (layers from most to least important, inside a layer
attn_v, ffn_down, attn_output, attn_k, attn_q, ffn_gate, ffn_up), each is raised to the upper
level while that stays within the budget. Every tensor kind therefore gets its upper type in a
prefix of the importance ranking.
"""

from __future__ import annotations

import itertools

from lwq_gguf.errors import PlanError
from lwq_gguf.plan.config import TOLERANCE, Plan, PlanConfig, check_range, fixed_type
from lwq_gguf.model.inventory import GGUFTensor
from lwq_gguf.quant.tensors import tensor_nbytes
from lwq_gguf.quant.types import legal_type

_KIND_PRIORITY = ("attn_v", "ffn_down", "attn_output", "attn_k", "attn_q", "ffn_gate", "ffn_up")

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



def _level(q: str, t: GGUFTensor) -> str:
    """What ladder type ``q`` is on ``t`` (llama.cpp's fallback); refused where it has none."""
    ty = legal_type(q, t.shape[0])
    if ty is None:
        raise PlanError(f"{t.name}: {q} cannot quantize its rows of {t.shape[0]} and has no "
                        "fallback: use a ladder of K-quants or legacy types (--ladder k)")
    return ty


def plan_two_level(tensors: tuple[GGUFTensor, ...], cfg: PlanConfig, order: tuple[int, ...]
                   ) -> Plan:
    """Plan every tensor with layers ranked ``order`` (most important first); see above."""
    rank = {layer: i for i, layer in enumerate(order)}
    total_elems = sum(t.numel for t in tensors)
    fixed = [fixed_type(t, cfg) for t in tensors]
    fixed_bits = sum(tensor_nbytes(ty, t.shape) * 8 for t, ty in zip(tensors, fixed)
                     if ty is not None)
    free = [i for i, ty in enumerate(fixed) if ty is None]
    emb = [i for i in free if tensors[i].name in _EMBED]
    units = sorted((i for i in free if i not in emb), key=lambda i: _priority(tensors[i], rank))
    levels = [[_level(q, t) for q in cfg.ladder] for t in tensors]
    shapes = [t.shape for t in tensors]
    n_levels = len(cfg.ladder)

    all_bpw = [(fixed_bits + sum(tensor_nbytes(levels[i][j], shapes[i]) * 8 for i in free))
               / total_elems for j in range(n_levels)]  # every free tensor at level j
    target = cfg.avg_bits
    check_range(cfg, all_bpw[0], all_bpw[-1])
    j = max([k for k in range(n_levels) if all_bpw[k] <= target] or [0])
    hi = min(j + 1, n_levels - 1)
    prefs = [hi] + list(range(j, -1, -1)) + list(range(hi + 1, n_levels))
    emb.sort(key=lambda i: tensors[i].name != "output.weight")  # output first: it matters more
    combos = sorted(itertools.product(range(len(prefs)), repeat=len(emb)), key=lambda c: (sum(c), c))
    best: Plan | None = None
    for combo in combos:
        e_level = {i: prefs[k] for i, k in zip(emb, combo)}
        emb_bits = sum(tensor_nbytes(levels[i][e], shapes[i]) * 8 for i, e in e_level.items())
        chosen, lo = _two_level(units, levels, shapes, target * total_elems - fixed_bits - emb_bits)
        chosen.update({i: levels[i][e] for i, e in e_level.items()})
        types = tuple(f if f is not None else chosen[i] for i, f in enumerate(fixed))
        plan = Plan(cfg, tensors, types, order, (cfg.ladder[lo], cfg.ladder[min(lo + 1, n_levels - 1)]))
        if abs(plan.bpw() - target) <= TOLERANCE:
            return plan
        if best is None or abs(plan.bpw() - target) < abs(best.bpw() - target):
            best = plan
    assert best is not None  # (combos holds at least the all-zero one)
    raise PlanError(f"--avg-bits {target:g}: the closest this model's tensors allow is "
                    f"{best.bpw():.3f} BPW (tensor steps too coarse): choose a nearby target")
