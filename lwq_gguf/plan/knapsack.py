"""Multiple-choice knapsack: one option per item, least total damage within a byte budget.

Exact dynamic programming over the budget cut into ``resolution`` units (option costs rounded
up, so the result never exceeds the budget); items with one option are fixed costs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def min_damage(options: Sequence[Sequence[tuple[int, float]]], budget: int, floor: int = 0,
               resolution: int = 1 << 16) -> list[int] | None:
    """``options[i]`` = [(bytes, damage), ...]; the chosen index per item: least total damage
    with total bytes in [floor, budget] (or, when no choice lands there, the least damage under
    ``budget``); None when even the cheapest choices exceed ``budget``."""
    least = [min(c for c, _ in opts) for opts in options]
    fixed = sum(least)
    if fixed > budget:
        return None
    unit = max(1.0, (budget - fixed) / resolution)
    # bytes above each item's cheapest option, in units (rounded up: never over budget)
    extra = [[math.ceil((c - m) / unit) for c, _ in opts] for opts, m in zip(options, least)]
    cap = int((budget - fixed) // unit)
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


def _top_up(options, out: list[int], budget: int) -> list[int]:
    """Spend what the rounding left: best damage saved per byte first, while it fits exactly."""
    used = sum(options[i][j][0] for i, j in enumerate(out))
    while True:
        moves = [((options[i][out[i]][1] - d) / (c - options[i][out[i]][0]), i, j)
                 for i, opts in enumerate(options) for j, (c, d) in enumerate(opts)
                 if d < options[i][out[i]][1] and 0 < c - options[i][out[i]][0] <= budget - used]
        if not moves:
            return out
        _, i, j = max(moves)
        used += options[i][j][0] - options[i][out[i]][0]
        out[i] = j
