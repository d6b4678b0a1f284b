"""Where the sensitivity sweeps' time goes, and what pruning dominated types could save.

    .venv/bin/python bench/sweep_cost.py --scores OUT/scores.json [--cols 1024] [--seconds 1.5]

The sweeps quantize each tensor's sampled rows (~64k weights) to every ladder type and back.
This measures, for every type of the scores file's ladder, the quantize + dequantize time per
weight (a 64 x COLS float32 block of random weights with a random imatrix, one thread) of the
rebuilt quantizers the sweeps run (lwq_gguf.quant.rebuilt), of the same built without AVX-512
(the paths a CPU without it runs) and of the pinned library's own,
and from the scores file's damage table (the full sweeps' result) how much of the sweep time goes
to types that are *dominated* on a tensor - some type of no more BPW has at most 1/M of its
damage, so the planner would never pick it. That share, at margins M, is the most that measuring
every type on a small row sample first and refining only the undominated ones could save, even
if the small sample were exact (it must also pay for itself). Every tensor is counted as one
sample of equal size (the default row sample is ~64k weights for every layer tensor).

Writes bench/results/sweep-cost-MODEL.{json,md}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from harness import RESULTS, parser, write_results

from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.quant.ggml import Ggml
from lwq_gguf.quant.rebuilt import Rebuilt
from lwq_gguf.quant.types import QUANT_TYPES
from lwq_gguf.report import markdown_table, table

MARGINS = (1.0, 1.25, 1.5, 2.0)


ROUNDS = 3  # each type is timed ROUNDS times per build, the builds interleaved; the fastest kept


def type_costs(ladder: list[str], cols: int, seconds: float
               ) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """Per build - ``rebuilt`` (what the sweeps run, lwq_gguf.quant.rebuilt), ``pinned`` (the
    pinned library's own), ``portable`` (the rebuilt ones compiled with -mno-avx512f, what a CPU
    without AVX-512 runs) - the ns per weight of one quantize + dequantize of each type (the
    fastest of ROUNDS rounds of ``seconds / ROUNDS``, the builds taking turns, so that a slow
    spell of a shared machine does not fall on one build) and the seconds of each type's first
    call in the process (its grid set-up)."""
    lc = find_llama_cpp()
    builds = {}
    for name, extra in (("rebuilt", ()), ("pinned", None), ("portable", ("-mno-avx512f",))):
        q = Ggml(lc, rebuilt=False)
        if extra is not None:
            q.rebuilt, why = Rebuilt.load(lc, extra)
            if q.rebuilt is None:
                raise SystemExit(f"sweep_cost: the rebuilt quantizers are not available: {why}")
        builds[name] = q
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, cols)) * 0.02).astype(np.float32)
    im = (rng.random(cols) + 0.1).astype(np.float32)
    out = {name: ({}, {}) for name in builds}
    for ty in ladder:
        for name, q in builds.items():
            t0 = time.perf_counter()
            q.roundtrip(w[:8], ty, im)  # (the first call in this process: the grid set-up)
            out[name][1][ty] = time.perf_counter() - t0
        best = dict.fromkeys(builds, float("inf"))
        for _ in range(ROUNDS):
            for name, q in builds.items():
                t0, n = time.perf_counter(), 0
                while time.perf_counter() - t0 < seconds / ROUNDS:
                    q.roundtrip(w, ty, im)
                    n += 1
                best[name] = min(best[name], (time.perf_counter() - t0) / n / w.size * 1e9)
        for name in builds:
            out[name][0][ty] = best[name]
    return out


def dominated(row: dict[str, float], q: str, margin: float) -> bool:
    bpw = QUANT_TYPES[q].bpw
    return any(o != q and QUANT_TYPES[o].bpw <= bpw and row[o] * margin <= row[q]
               and not (QUANT_TYPES[o].bpw == bpw and row[o] * margin == row[q]) for o in row)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--scores", type=Path, required=True, help="a scores JSON with damage tables")
    ap.add_argument("--key", default="auto@ggml", help="the damage table (imatrix@encoder)")
    ap.add_argument("--cols", type=int, default=1024, help="row width of the timed block")
    ap.add_argument("--seconds", type=float, default=1.5, help="timing per type and build")
    ap.add_argument("--results", type=Path, default=None)
    a = ap.parse_args()
    doc = json.loads(a.scores.read_text())
    damage = doc["sensitivity"]["damage"][a.key]
    ladder = sorted({q for row in damage.values() for q in row}, key=lambda q: QUANT_TYPES[q].bpw)
    costs = type_costs(ladder, a.cols, a.seconds)
    (cost, setup), (pinned, setup_pinned) = costs["rebuilt"], costs["pinned"]
    portable = costs["portable"][0]
    total_portable = sum(portable[q] for row in damage.values() for q in row)
    total_pinned = sum(pinned[q] for row in damage.values() for q in row)
    total = sum(cost[q] for row in damage.values() for q in row)
    share = {q: sum(cost[q] for row in damage.values() if q in row) / total for q in ladder}
    prune = []
    for m in MARGINS:
        n = sum(dominated(row, q, m) for row in damage.values() for q in row)
        c = sum(cost[q] for row in damage.values() for q in row if dominated(row, q, m))
        prune.append({"margin": m, "types_dominated": n / sum(map(len, damage.values())),
                      "cost_dominated": c / total})
    head = ("type", "BPW", "ns / weight", "pinned library ns / weight", "speed-up",
            "without AVX-512 ns / weight", "speed-up without AVX-512", "share of the sweeps")
    cells = [(q, f"{QUANT_TYPES[q].bpw:.3f}", f"{cost[q]:.1f}", f"{pinned[q]:.1f}",
              f"{pinned[q] / cost[q]:.2f}x", f"{portable[q]:.1f}",
              f"{pinned[q] / portable[q]:.2f}x", f"{share[q]:.1%}")
             for q in sorted(ladder, key=lambda q: -share[q])]
    cells.append(("all (this table's pairs)", "", f"{total / len(damage):.0f}",
                  f"{total_pinned / len(damage):.0f}", f"{total_pinned / total:.2f}x",
                  f"{total_portable / len(damage):.0f}", f"{total_pinned / total_portable:.2f}x",
                  ""))
    phead = ("margin M", "(tensor, type) pairs dominated", "sweep time in them")
    pcells = [(f"{p['margin']:g}", f"{p['types_dominated']:.0%}", f"{p['cost_dominated']:.0%}")
              for p in prune]
    grids = [q for q in ladder if setup_pinned[q] > 0.01]
    shead = ("type", "grid set-up s, pinned", "rebuilt")
    scells = [(q, f"{setup_pinned[q]:.2f}", f"{setup[q]:.2f}") for q in grids]
    scells.append(("all", f"{sum(setup_pinned.values()):.2f}", f"{sum(setup.values()):.2f}"))
    print(table(head, cells))
    print(table(shead, scells))
    print(table(phead, pcells))
    name = a.scores.resolve().parent.name
    results = a.results or RESULTS / f"sweep-cost-{name}.json"
    write_results(results, {"scores": str(a.scores), "key": a.key, "cols": a.cols,
                            "tensors": len(damage), "ns_per_weight": cost,
                            "ns_per_weight_pinned": pinned, "speedup": total_pinned / total,
                            "ns_per_weight_without_avx512": portable,
                            "setup_s": setup, "setup_s_pinned": setup_pinned,
                            "speedup_without_avx512": total_pinned / total_portable,
                            "share": share,
                            "pruning": prune},
                  f"Sweep cost per type and the dominated share: {name}",
                  f"Scores {a.scores} ({len(damage)} tensors, table {a.key}); timing on a 64 x "
                  f"{a.cols} block, one thread, the rebuilt quantizers (the sweeps'), the "
                  f"pinned library's own and the rebuilt ones built with -mno-avx512f (a CPU "
                  f"without AVX-512); the all row: ns per weight summed over a tensor's types\n\n"
                  f"{markdown_table(head, cells)}\n\nThe first call of each type in the process "
                  f"(ggml's grid set-up, on its own threads), seconds:\n\n"
                  f"{markdown_table(shead, scells)}\n\n{markdown_table(phead, pcells)}\n")


if __name__ == "__main__":
    main()
