"""What the fast sensitivity costs the plans: bf16 matmuls, sampled rows and a shorter Fisher,
against a fuller measurement.

    .venv/bin/python bench/fidelity.py [--model models/smollm2-135m-k256] [--against fp32]
    .venv/bin/python bench/fidelity.py --against all-rows --uniform

Measures the damage tables (imatrix auto, the default encoder, the default ladder) twice on the
same calibration tokens: the default, and a reference -

* ``--against fp32`` (default): the same sampled rows and Fisher, the model pass's matmuls in
  fp32 (the default takes bf16 where the CPU multiplies it natively:
  score.layers.matmul_precision);
* ``--against every-row``: every row of every tensor, the Fisher over all 4,096 tokens, fp32 -
  what all of the shortcuts cost together;
* ``--against all-rows``: every row of every tensor, the same Fisher tokens and precision - what
  the row sample alone costs (``--uniform``: also the fixed uniform sample of 65,536 weights per
  tensor that the rows drawn by damage replaced, against the same reference);
* ``--against pinned``: the same, with the pinned library's own quantizers
  (``LWQ_QUANTIZERS=pinned``) instead of the rebuilt ones - which must give every entry exactly.

Plans at 2.5 ... 6 BPW are made from each, and each plan is scored by the reference tables: the
relative excess of the default plan's reference damage over the reference plan's is what the
shortcuts cost (0: the same quality as the reference measurement predicts; the bound for a
shortcut is 1 %). Also per type: how far the default table sits from the reference, tensor by
tensor. Writes bench/results/fidelity-AGAINST-MODEL.{json,md} and prints the tables.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from harness import RESULTS, ROOT, commit, parser, write_results

from lwq_gguf.errors import PlanError
from lwq_gguf.model.inventory import model_tensors
from lwq_gguf.model.load import open_model
from lwq_gguf.plan.plan import PlanConfig, make_plan
from lwq_gguf.quant.encoder import damage_key
from lwq_gguf.quant.types import AUTO_LADDER
from lwq_gguf.report import markdown_table, table
from lwq_gguf.score import sensitivity
from lwq_gguf.score.sample import EVERY_ROW, UNIFORM, RowSample
from lwq_gguf.score.scores import ScoreConfig

BITS = (2.5, 2.75, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0)


def tables(model, tensors, rows: RowSample, cfg: ScoreConfig) -> tuple[dict, float, float]:
    """(the damage table, its seconds, the sweeps' CPU seconds)."""
    key = damage_key("auto", "lwq")
    t0 = time.time()
    m = sensitivity.measure_sensitivity(
        model, tensors, sensitivity.SensitivityRequest(ladder=AUTO_LADDER, keys=(key,), rows=rows),
        replace(cfg, device="cpu"), progress=False)
    return (m.sensitivity["damage"][key], round(time.time() - t0, 1),
            round(m.sensitivity["phases"].get("sweeps", 0.0), 1))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-k256")
    ap.add_argument("--against", choices=("fp32", "every-row", "all-rows", "pinned"),
                    default="fp32")
    ap.add_argument("--uniform", action="store_true",
                    help="also the uniform row sample (score.sample.UNIFORM) against the reference")
    a = ap.parse_args()
    model = open_model(a.model)
    tensors = model_tensors(model)
    cfg = ScoreConfig()
    if a.against == "fp32":
        full, t_full, s_full = tables(model, tensors, sensitivity.ROWS,
                                      replace(cfg, precision="fp32"))
    elif a.against == "pinned":
        os.environ["LWQ_QUANTIZERS"] = "pinned"
        full, t_full, s_full = tables(model, tensors, sensitivity.ROWS, cfg)
        del os.environ["LWQ_QUANTIZERS"]
    elif a.against == "all-rows":
        full, t_full, s_full = tables(model, tensors, EVERY_ROW, cfg)
    else:
        full, t_full, s_full = tables(model, tensors, EVERY_ROW,
                                      replace(cfg, fisher_tokens=cfg.calib_tokens,
                                              precision="fp32"))
    fast, t_fast, s_fast = tables(model, tensors, sensitivity.ROWS, cfg)
    uni = tables(model, tensors, UNIFORM, cfg) if a.uniform else None
    rows = []
    for bits in BITS:
        pc = PlanConfig(avg_bits=bits)
        cost = {}
        for name, tab in (("full", full), ("default", fast), ("uniform", uni[0] if uni else None)):
            if tab is None:
                continue
            try:
                p = make_plan(tensors, model.n_layers, pc, (), (), tab)
            except PlanError:  # (below the smallest file this model allows)
                break
            cost[name] = sum(full[t.name][ty] for t, ty in zip(p.tensors, p.types) if t.name in full)
            if name == "full":
                ref = p.types
            elif name == "default":
                same = sum(x == y for x, y in zip(p.types, ref))
        if len(cost) < 2:
            continue
        rows.append({"avg_bits": bits, "full_plan_damage": cost["full"],
                     "default_plan_damage": cost["default"],
                     "excess": round(cost["default"] / cost["full"] - 1, 4),
                     "same_types": same, "tensors": len(tensors),
                     **({"uniform_excess": round(cost["uniform"] / cost["full"] - 1, 4)}
                        if "uniform" in cost else {})})
    head = ("BPW", "reference plan damage", "default plan damage (reference tables)", "excess",
            "same types", *(("excess of the uniform sample",) if uni else ()))
    cells = [(r["avg_bits"], f"{r['full_plan_damage']:.4g}", f"{r['default_plan_damage']:.4g}",
              f"{100 * r['excess']:+.2f} %", f"{r['same_types']}/{r['tensors']}",
              *((f"{100 * r['uniform_excess']:+.2f} %",) if uni else ())) for r in rows]
    print(table(head, cells))
    import numpy as np

    per_type = {}  # default / reference per (tensor, type): how far the tables themselves move
    for ty in sorted({q for row in full.values() for q in row}):
        r = np.array([fast[n][ty] / full[n][ty] for n in full
                      if ty in full[n] and n in fast and full[n][ty] > 0])
        if len(r):
            per_type[ty] = {"median": round(float(np.median(r)), 4),
                            "p90_dev": round(float(np.quantile(abs(r - 1), 0.9)), 4)}
    thead = ("type", "median default / reference", "90th pct |deviation|")
    tcells = [(ty, f"{v['median']:.3f}", f"{100 * v['p90_dev']:.1f} %")
              for ty, v in per_type.items()]
    print(table(thead, tcells))
    worst = max((abs(r["excess"]) for r in rows), default=0.0)
    pairs = [(n, ty) for n in full for ty in full[n]]
    identical = sum(fast.get(n, {}).get(ty) == full[n][ty] for n, ty in pairs)
    timing = (f"tables: reference {t_full} s (sweeps {s_full} CPU-s), default {t_fast} s "
              f"(sweeps {s_fast} CPU-s); worst excess {100 * worst:.2f} % (target <= 1 %: "
              f"{'met' if worst <= 0.01 else 'MISSED'}); entries identical to the reference's: "
              f"{identical} of {len(pairs)}")
    if uni:
        timing += (f"; the uniform sample: {uni[1]} s (sweeps {uni[2]} CPU-s), worst excess "
                   f"{100 * max(abs(r['uniform_excess']) for r in rows):.2f} %")
    print(table(head, cells))
    print(timing)
    write_results(RESULTS / f"fidelity-{a.against}-{a.model.name}.json",
                  {"model": str(a.model), "against": a.against, "commit": commit(),
                   "seconds_full": t_full, "seconds_default": t_fast, "sweeps_cpu_full": s_full,
                   "sweeps_cpu_default": s_fast, "worst_excess": worst, "rows": rows,
                   "entries": len(pairs), "entries_identical": identical,
                   **({"seconds_uniform": uni[1], "sweeps_cpu_uniform": uni[2]} if uni else {}),
                   "per_type": per_type},
                  f"Fidelity: the default sensitivity tables against {a.against} ({a.model.name})",
                  f"Model {a.model.name}; reference: {a.against}.\n\n{timing}.\n\n{markdown_table(head, cells)}\n\n{markdown_table(thead, tcells)}\n")

if __name__ == "__main__":
    main()
