"""What the fast sensitivity costs the plans: sampled rows and a shorter Fisher against the full.

    .venv/bin/python bench/fidelity.py [--model models/smollm2-135m-k256]

Measures the damage tables (imatrix auto, the default encoder) twice on the same calibration
tokens: "full" - every row of every tensor, the Fisher over all 4,096 tokens - and the default
(about 65,536 weights per tensor, the Fisher over 1,024 tokens). Plans at several sizes are made
from each, and each plan is scored by the full tables: the relative excess of the default plan's
full-table damage over the full plan's is what the shortcuts cost (0 = the same quality as
predicted by the measurement itself). Writes bench/results/fidelity.json and .md and prints a
table.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from harness import RESULTS, ROOT, parser, write_results

from lwq_gguf.model.inventory import model_tensors
from lwq_gguf.model.load import open_model
from lwq_gguf.plan.plan import PlanConfig, make_plan
from lwq_gguf.quant.encoder import damage_key
from lwq_gguf.quant.types import AUTO_LADDER
from lwq_gguf.report import markdown_table, table
from lwq_gguf.score import sensitivity
from lwq_gguf.score.sample import EVERY_ROW, RowSample
from lwq_gguf.score.scores import ScoreConfig

BITS = (2.75, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0)


def tables(model, tensors, rows: RowSample, cfg: ScoreConfig) -> tuple[dict, float]:
    key = damage_key("auto", "lwq")
    t0 = time.time()
    m = sensitivity.measure_sensitivity(
        model, tensors, sensitivity.SensitivityRequest(ladder=AUTO_LADDER, keys=(key,), rows=rows),
        replace(cfg, device="cpu"), progress=False)
    return m.sensitivity["damage"][key], round(time.time() - t0, 1)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-k256")
    a = ap.parse_args()
    model = open_model(a.model)
    tensors = model_tensors(model)
    cfg = ScoreConfig()
    full, t_full = tables(model, tensors, EVERY_ROW, replace(cfg, fisher_tokens=cfg.calib_tokens))
    fast, t_fast = tables(model, tensors, sensitivity.ROWS, cfg)
    rows = []
    for bits in BITS:
        pc = PlanConfig(avg_bits=bits)
        cost = {}
        for name, tab in (("full", full), ("default", fast)):
            p = make_plan(tensors, model.n_layers, pc, (), (), tab)
            cost[name] = sum(full[t.name][ty] for t, ty in zip(p.tensors, p.types) if t.name in full)
            if name == "full":
                ref = p.types
            else:
                same = sum(x == y for x, y in zip(p.types, ref))
        rows.append({"avg_bits": bits, "full_plan_damage": cost["full"],
                     "default_plan_damage": cost["default"],
                     "excess": round(cost["default"] / cost["full"] - 1, 4),
                     "same_types": same, "tensors": len(tensors)})
    head = ("BPW", "full plan damage", "default plan damage (full tables)", "excess",
            "same types")
    cells = [(r["avg_bits"], f"{r['full_plan_damage']:.4g}", f"{r['default_plan_damage']:.4g}",
              f"{100 * r['excess']:+.2f} %", f"{r['same_types']}/{r['tensors']}") for r in rows]
    print(table(head, cells))
    print(f"tables: full {t_full} s, default {t_fast} s")
    write_results(RESULTS / "fidelity.json",
                  {"model": str(a.model), "seconds_full": t_full, "seconds_default": t_fast,
                   "rows": rows},
                  "Fidelity: the default sensitivity tables against the full ones",
                  f"Tables: full {t_full} s, default {t_fast} s.\n\n{markdown_table(head, cells)}")

if __name__ == "__main__":
    main()
