"""Mixture of experts: lwq-gguf against llama.cpp's mixes on the 6-expert demo model, and a split
budget.

    .venv/bin/python bench/moe.py [--text FILE] [--chunks 40] [--dense-bits 3.5]

The model is models/smollm2-135m-moe6 (`make models`): the aligned demo model with each layer's FFN
split into 6 experts of 256 rows, all active at equal weight (llama.cpp runs it as a 6-expert MoE;
its 16-bit GGUF has the dense model's perplexity). For llama.cpp's Q2_K, Q3_K_M and Q4_K_M, each
built with an imatrix, lwq-gguf's default converts at the mix's size (bench/quality.py's rule;
imatrix auto on both sides: computed from the calibration text, never the evaluation text). Then
the split budget, as the model would run with -ot exps=CPU on a GPU too small for the plan's own
non-expert part: at Q3_K_M's size, every tensor but the routed experts bounded by --dense-bits
(below the ~4.35 BPW the unconstrained plan gives them), the experts filling the rest; its KLD
and both parts' sizes next to the unconstrained plan's. Writes bench/results/moe.json
and moe.md.
"""

from __future__ import annotations

import time
from pathlib import Path

from harness import RESULTS, ROOT, WIKI_OR_NONE, parser, write_results
from quality import run

from lwq_gguf.publish.compare import CompareConfig, run_compare
from lwq_gguf.evaluate.perplexity import EvalConfig
from lwq_gguf.plan.plan import Plan, PlanConfig
from lwq_gguf.quant.imatrix import ImatrixChoice
from lwq_gguf.report import markdown_table, table
from lwq_gguf.score.scores import ScoreConfig

MODEL = ROOT / "models" / "smollm2-135m-moe6"
MIXES = ("Q2_K", "Q3_K_M", "Q4_K_M")


def plan_of(gguf_file: Path) -> Plan:
    from gguf import GGUFReader

    return Plan.from_json(GGUFReader(str(gguf_file)).get_field("lwq.plan").contents())


def split_example(text: Path, chunks: int, out_root: Path, target: float, dense_bits: float
                  ) -> dict:
    """At ``target`` BPW: the plan with the non-expert part within ``dense_bits``, and without."""
    out = {}
    for name, plan in (("split", PlanConfig(avg_bits=target, dense_bits=dense_bits)),
                       ("free", PlanConfig(avg_bits=target))):
        cfg = CompareConfig(model=MODEL, out_dir=out_root / f"split-{name}", text=text,
                            targets=(target,), plan=plan, baselines=(),
                            imatrix=ImatrixChoice.parse("auto"), score=ScoreConfig(device="cpu"),
                            eval=EvalConfig(ctx=512, chunks=chunks, device="cpu"))
        row = next(r for r in run_compare(cfg).rows if r.kind == "lwq-gguf")
        p = plan_of(cfg.out_dir / row.file)
        out[name] = {"bpw": row.bpw, "kld": row.result.kld_mean, "ppl": row.result.ppl,
                     "same_top": row.result.same_top_pct, "dense_mib": p.dense_nbytes / 2**20,
                     "experts_mib": (p.nbytes - p.dense_nbytes) / 2**20,
                     "dense_bpw": p.dense_nbytes * 8 / sum(t.numel for t in p.tensors
                                                           if "_exps." not in t.name)}
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--text", type=Path, default=WIKI_OR_NONE)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--dense-bits", type=float, default=3.5)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "moe")
    ap.add_argument("--results", type=Path, default=RESULTS / "moe.json")
    a = ap.parse_args()
    if a.text is None:
        ap.error("--text FILE is needed (WikiText-2 test is not in ../shared here)")
    t0 = time.time()
    rows = run(a.text, a.chunks, ["auto"], a.out / a.text.stem, "auto", model=MODEL, mixes=MIXES)
    target = next(r for r in rows if r["mix"] == "Q3_K_M")["target"]
    split = split_example(a.text, a.chunks, a.out / a.text.stem, target, a.dense_bits)
    head = ("mix", "BPW mix/ours", "MiB mix/ours", "KLD mix", "KLD ours", "ratio",
            "same top mix/ours", "PPL mix/ours")
    cells = [(r["mix"], f"{r['mix_bpw']:.3f} / {r['ours_bpw']:.3f}",
              f"{r['mix_mib']:.3f} / {r['ours_mib']:.3f}", f"{r['mix_kld']:.4f}",
              f"{r['ours_kld']:.4f}", f"{r['kld_ratio']:.3f}",
              f"{r['mix_same_top']:.1f} / {r['ours_same_top']:.1f}",
              f"{r['mix_ppl']:.2f} / {r['ours_ppl']:.2f}") for r in rows]
    shead = ("plan", "BPW", "non-expert MiB (BPW)", "experts MiB", "KLD", "same top %", "PPL")
    scells = [(f"--dense-bits {a.dense_bits:g}" if k == "split" else "no split", f"{v['bpw']:.3f}",
               f"{v['dense_mib']:.2f} ({v['dense_bpw']:.2f})", f"{v['experts_mib']:.2f}",
               f"{v['kld']:.4f}", f"{v['same_top']:.1f}", f"{v['ppl']:.2f}")
              for k, v in split.items()]
    verdict = (f"max KLD ratio {max(r['kld_ratio'] for r in rows):.3f} over {len(rows)} mixes "
               f"(target <= 0.8); every file no larger than its mix: "
               f"{all(r['ours_bytes'] <= r['mix_bytes'] for r in rows)}; split plan's non-expert "
               f"part {split['split']['dense_bpw']:.2f} BPW (limit {a.dense_bits:g})")
    print(table(head, cells))
    print(table(shead, scells))
    print(verdict)
    seconds = round(time.time() - t0)
    write_results(
        a.results,
        {"model": str(MODEL.relative_to(ROOT)), "text": str(a.text), "chunks": a.chunks,
         "seconds": seconds, "verdict": verdict, "rows": rows, "split": split,
         "split_target_bpw": target, "dense_bits": a.dense_bits},
        "Mixture of experts: lwq-gguf vs llama.cpp mixes at equal size",
        f"Model {MODEL.relative_to(ROOT)}; text {a.text.name}, {a.chunks} chunks x 512; imatrix "
        f"on both sides; {seconds} s\n\n{markdown_table(head, cells)}\n\n"
        f"Split budget at {target:g} BPW (Q3_K_M's size):\n\n{markdown_table(shead, scells)}\n\n"
        f"{verdict}")

if __name__ == "__main__":
    main()
