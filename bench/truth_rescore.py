"""The truth's pairs against estimates made with other Fisher token counts, and what each costs.

    .venv/bin/python bench/truth_rescore.py [--truth bench/results/truth-gemma3-270m.json]
                                            [--fisher-tokens 1024 2048 4096]

bench/truth.py measured single-tensor KLD for a sample of (tensor, type) pairs. Those
measurements do not depend on how the planner estimates; this re-estimates the same pairs with
the Fisher taken over other numbers of calibration tokens (``lwq-gguf score --fisher-tokens N
--ladder all --rescore``, timed whole as a child process; the imatrix, from all calibration
tokens, is the same for every N) and, for each N, reports:

* the rank correlation of estimate and measurement over all pairs;
* the *tensor error*: per tensor, the median over its types of measured / estimated (pairs at
  the runtime floor left out, as bench/truth.py does), then over tensors the median, the range
  and the spread (geometric standard deviation). A common factor does not change a plan; a
  spread between tensors moves bits to the wrong ones;
* per layer of the sample, the median tensor error;
* the score time.

Writes bench/results/truth-rescore-MODEL.{json,md}.
"""

from __future__ import annotations

import json
import math
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from harness import RESULTS, ROOT, parser, run_child, write_results

from truth import FLOOR, spearman

from lwq_gguf.report import markdown_table, table


def layer_of(name: str) -> str:
    m = re.match(r"blk\.(\d+)\.", name)
    return m.group(1) if m else name.split(".")[0]


def assess(pairs: list[dict], damage: dict) -> dict:
    """The pairs' measurements against the estimates of ``damage``."""
    est = [damage[p["tensor"]][p["type"]] for p in pairs]
    floor = {p["tensor"]: p["kld"] for p in pairs if p["type"] == "q8_0"}
    per_tensor: dict[str, list[float]] = {}
    for p, e in zip(pairs, est):
        if e > 0 and p["kld"] > FLOOR * floor.get(p["tensor"], 0):
            per_tensor.setdefault(p["tensor"], []).append(p["kld"] / e)
    err = {n: float(np.median(v)) for n, v in per_tensor.items()}
    logs = np.log(list(err.values()))
    layers: dict[str, list[float]] = {}
    for n, v in err.items():
        layers.setdefault(layer_of(n), []).append(v)
    by_tensor: dict[str, dict[str, float]] = {}
    for p, e in zip(pairs, est):
        if e > 0:
            by_tensor.setdefault(p["tensor"], {})[p["type"]] = p["kld"] / e
    per_type: dict[str, dict] = {}
    for ty in sorted({p["type"] for p in pairs}):
        own = [(r[ty], float(np.median([v for k, v in r.items() if k != ty])))
               for r in by_tensor.values() if ty in r and len(r) > 1]
        mine = [(p["kld"], e) for p, e in zip(pairs, est) if p["type"] == ty]
        per_type[ty] = {"pairs": len(mine),
                        "spearman": spearman([e for _, e in mine], [k for k, _ in mine]),
                        "measured_over_estimate": float(np.median([a for a, _ in own])),
                        "vs_other_types": float(np.median([a / b for a, b in own]))}
    return {"spearman": spearman(est, [p["kld"] for p in pairs]),
            "per_type": per_type,
            "tensor_error_median": float(np.exp(np.median(logs))),
            "tensor_error_min": float(np.exp(logs.min())),
            "tensor_error_max": float(np.exp(logs.max())),
            "tensor_error_gsd": float(np.exp(logs.std())),
            "per_layer": {k: float(np.median(v)) for k, v in layers.items()},
            "tensor_error": err}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--truth", type=Path, default=RESULTS / "truth-gemma3-270m.json")
    ap.add_argument("--fisher-tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--results", type=Path, default=None)
    a = ap.parse_args()
    truth = json.loads(a.truth.read_text())
    model = Path(truth["model"])
    model = model if model.is_absolute() else ROOT / model
    pairs = truth["pairs"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.fisher_tokens:
            out = Path(tmp) / f"f{n}.scores.json"
            timed = run_child([sys.executable, "-m", "lwq_gguf", "-q", "score", model,
                               "--fisher-tokens", n, "--ladder", "all", "--rescore", "-o", out],
                              who=f"score --fisher-tokens {n}")
            tables = json.loads(out.read_text())["sensitivity"]["damage"]
            key = "auto@ggml" if "auto@ggml" in tables else next(k for k in tables
                                                                 if k.startswith("auto@"))
            # (score's default encoder is lwq-gguf's own for Q4_K; the truth files are ggml's)
            same = [p for p in pairs if key.endswith("@ggml") or p["type"] != "q4_k"]
            rows.append({"fisher_tokens": n, "table": key, "pairs": len(same), **timed,
                         **assess(same, tables[key])})
            print(f"fisher tokens {n}: rank {rows[-1]['spearman']:.3f}, tensor error spread "
                  f"{rows[-1]['tensor_error_gsd']:.2f}x, {timed['seconds']} s", flush=True)
    layers = sorted({k for r in rows for k in r["per_layer"]},
                    key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    head = ("Fisher tokens", "score s", "pairs", "rank corr.", "tensor error: median", "min", "max",
            "spread (GSD)") + tuple(f"layer {k}" if k.isdigit() else k for k in layers)
    cells = [(r["fisher_tokens"], f"{r['seconds']:.1f}", r["pairs"], f"{r['spearman']:.3f}",
              f"{r['tensor_error_median']:.2f}", f"{r['tensor_error_min']:.2f}",
              f"{r['tensor_error_max']:.2f}", f"{r['tensor_error_gsd']:.2f}")
             + tuple(f"{r['per_layer'].get(k, math.nan):.2f}" for k in layers) for r in rows]
    print(table(head, cells))
    types = sorted({t for r in rows for t in r["per_type"]})
    type_head = ("Fisher tokens", "type", "pairs", "rank corr.", "measured/est. median",
                 "vs the tensor's other types: median")
    type_cells = [(r["fisher_tokens"], t, r["per_type"][t]["pairs"],
                   f"{r['per_type'][t]['spearman'] or math.nan:.2f}",
                   f"{r['per_type'][t]['measured_over_estimate']:.2f}",
                   f"{r['per_type'][t]['vs_other_types']:.2f}") for r in rows for t in types
                  if t in r["per_type"]]
    print(table(type_head, type_cells))
    name = model.name
    write_results(a.results or RESULTS / f"truth-rescore-{name}.json",
                  {"truth": str(a.truth), "truth_date": truth["date"], "model": str(model),
                   "pairs": len(pairs), "rows": rows},
                  f"The truth's pairs against other Fisher token counts: {name}",
                  f"{len(pairs)} pairs measured by bench/truth.py ({a.truth.name}, "
                  f"{truth['date']}); estimates from `lwq-gguf score --fisher-tokens N --ladder all "
                  f"--rescore`, seconds: that whole command; score's own Q4_K encoder is not the truth "
                  f"files' (ggml's), so Q4_K pairs are left out\n\n"
                  f"{markdown_table(head, cells)}\n\n*Tensor error*: per tensor the median over "
                  f"its types of measured / estimated (pairs within {FLOOR}x the tensor's Q8_0 KLD "
                  "left out); a factor common to every tensor does not change a plan, the spread "
                  "(geometric standard deviation over tensors) moves bits between them.\n\n"
                  f"Per type (every pair of the type; *vs the tensor's other types*: measured / "
                  f"estimated divided by its median over the same tensor's other types):\n\n"
                  f"{markdown_table(type_head, type_cells)}\n")


if __name__ == "__main__":
    main()
