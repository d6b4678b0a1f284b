"""Multiple-choice knapsack: one option per item, least total damage within a byte budget
(and, for a mixture-of-experts model run with its experts in host memory, a second budget for the
non-expert part).

Exact dynamic programming over the budget cut into ``resolution`` units (option costs rounded
up, so the result never exceeds the budget); items with one option are fixed costs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _table(options, cap: int, unit: float):
    """The DP over ``cap`` units: (best[b] = least damage using b units above the cheapest
    options, walk(b) -> the choices, extra units per option)."""
    least = [min(c for c, _ in opts) for opts in options]
    # bytes above each item's cheapest option, in units (rounded up: never over budget)
    extra = [[math.ceil((c - m) / unit) for c, _ in opts] for opts, m in zip(options, least)]
    best = np.full(cap + 1, np.inf)  # best[b]: least damage of the items so far using b units
    best[0] = 0.0
    choice = np.zeros((len(options), cap + 1), dtype=np.int16)
    for i, opts in enumerate(options):
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for j, (_, dmg) in enumerate(opts):
            e = extra[i][j]
            if e > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[e:] = best[: cap + 1 - e] + dmg
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        best, choice[i] = new, pick

    def walk(b: int) -> list[int]:
        out = [0] * len(options)
        for i in range(len(options) - 1, -1, -1):
            out[i] = int(choice[i, b])
            b -= extra[i][out[i]]
        return out

    return best, walk


def min_damage(options: Sequence[Sequence[tuple[int, float]]], budget: int, floor: int = 0,
               resolution: int = 1 << 16) -> list[int] | None:
    """``options[i]`` = [(bytes, damage), ...]; the chosen index per item: least total damage
    with total bytes in [floor, budget] (or, when no choice lands there, the least damage under
    ``budget``); None when even the cheapest choices exceed ``budget``."""
    fixed = sum(min(c for c, _ in opts) for opts in options)
    if fixed > budget:
        return None
    unit = max(1.0, (budget - fixed) / resolution)
    best, walk = _table(options, int((budget - fixed) // unit), unit)
    order = np.argsort(best, kind="stable")
    # a cell's units over-count its bytes (costs rounded up), so only cells of at least the
    # floor's units can reach it: try the least-damage ones of those
    reach = max(0, math.ceil((floor - fixed) / unit))
    for b in [b for b in order if b >= reach][: 64]:
        if not np.isfinite(best[b]):
            break
        out = _top_up(options, walk(int(b)), budget)
        if sum(options[i][j][0] for i, j in enumerate(out)) >= floor:
            return out
    return _top_up(options, walk(int(order[0])), budget)


def min_damage_split(options: Sequence[Sequence[tuple[int, float]]], dense: Sequence[bool],
                     budget: int, dense_budget: int, floor: int = 0, resolution: int = 1 << 16
                     ) -> list[int] | None:
    """As :func:`min_damage`, with a second limit: the items marked ``dense`` together within
    ``dense_budget`` bytes (a mixture-of-experts model's non-expert part). Exact over the budget
    units: each group's least-damage curve, combined at the best split of the units, the total
    at least ``floor`` when some split gets there."""
    groups = ([i for i, d in enumerate(dense) if d], [i for i, d in enumerate(dense) if not d])
    least = [min(c for c, _ in opts) for opts in options]
    fixed, fixed_dense = sum(least), sum(least[i] for i in groups[0])
    if fixed > budget or fixed_dense > dense_budget:
        return None
    unit = max(1.0, (budget - fixed) / resolution)
    cap = int((budget - fixed) // unit)
    cap_dense = min(cap, int((dense_budget - fixed_dense) // unit))
    best_d, walk_d = _table([options[i] for i in groups[0]], cap_dense, unit)
    best_x, walk_x = _table([options[i] for i in groups[1]], cap, unit)
    reach = max(0, math.ceil((floor - fixed) / unit))
    for width in (cap - reach, cap):  # total units in [reach, cap]; else anything within cap
        arg = _window_argmin(best_x, width)  # arg[e]: the best expert cell in [e - width, e]
        total = best_d + best_x[arg[cap - np.arange(cap_dense + 1)]]
        if np.isfinite(total).any():
            break
    b_d = int(np.argmin(total))
    out = [0] * len(options)
    for group, picks in ((groups[0], walk_d(b_d)), (groups[1], walk_x(int(arg[cap - b_d])))):
        for i, j in zip(group, picks):
            out[i] = j
    return _top_up(options, out, budget, dense, dense_budget)


def _window_argmin(values: np.ndarray, width: int) -> np.ndarray:
    """arg[e] = the index of the least of values[max(0, e - width) .. e] (a monotone deque)."""
    from collections import deque

    arg = np.zeros(len(values), dtype=np.int64)
    q: deque[int] = deque()
    for e, v in enumerate(values):
        while q and values[q[-1]] >= v:
            q.pop()
        q.append(e)
        if q[0] < e - width:
            q.popleft()
        arg[e] = q[0]
    return arg


def _top_up(options, out: list[int], budget: int, dense: Sequence[bool] | None = None,
            dense_budget: int = 0) -> list[int]:
    """Spend what the rounding left: best damage saved per byte first, while it fits exactly
    (and, with ``dense``, while the dense items stay within ``dense_budget``)."""
    used = sum(options[i][j][0] for i, j in enumerate(out))
    used_dense = sum(options[i][j][0] for i, j in enumerate(out) if dense and dense[i])
    while True:
        moves = []
        for i, opts in enumerate(options):
            c0, d0 = opts[out[i]]
            room = budget - used
            if dense is not None and dense[i]:
                room = min(room, dense_budget - used_dense)
            moves += [((d0 - d) / (c - c0), i, j) for j, (c, d) in enumerate(opts)
                      if d < d0 and 0 < c - c0 <= room]
        if not moves:
            return out
        _, i, j = max(moves)
        step = options[i][j][0] - options[i][out[i]][0]
        used += step
        if dense is not None and dense[i]:
            used_dense += step
        out[i] = j
