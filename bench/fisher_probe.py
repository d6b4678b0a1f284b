"""Probe: does a gradient-weighted importance matrix encode better than llama-imatrix's?

    .venv/bin/python bench/fisher_probe.py [--mixes Q3_K_M,Q4_K_S,Q4_K_M,IQ4_XS] [--chunks 40]
    (after bench/quality.py: it reuses out/quality/MODEL/imatrix-auto)

Not a feature yet: a measurement that decides the next step of the quality work. ggml's encoders
weight each column j of a weight by the importance the imatrix gives it, the mean of x_j^2 over
the calibration tokens. What a quantization error costs in KL-divergence is, to second order,
sum_ij F_ij e_ij^2 with F the Fisher diagonal, F_ij = E[g_i^2 x_j^2] (g the gradient at the
output row i): tokens whose output does not move the loss (for instance a chunk's first token,
whose activations are the largest) count by their gradient, not by their activations. This
probe replaces each tensor's imatrix column weights by sum_i F_ij (the scorer's streamed Fisher,
every row, over --fisher-tokens calibration tokens of the packaged calibration text), writes it
as an imatrix GGUF, and measures in llama.cpp (mean KLD against the F16 GGUF, WikiText-2 test):

* llama.cpp's mixes quantized by llama-quantize with llama-imatrix's importance (the files
  bench/quality.py made) and with the Fisher one;
* lwq-gguf at each mix's size (as bench/quality.py sizes it) with each importance (`convert
  --imatrix FILE`: scored, planned and written with it).

Writes bench/results/fisher-probe.json and .md.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from harness import RESULTS, ROOT, WIKI, parser, write_results
from quality import size_target

from lwq_gguf.llamacpp import find_llama_cpp, run_tool
from lwq_gguf.report import markdown_table, table

MODEL = ROOT / "models" / "smollm2-135m-k256-cont"


def fisher_imatrix(model_dir: Path, fisher_tokens: int, path: Path) -> dict:
    """Write the Fisher-weighted imatrix to ``path``; {tensor: correlation of log importances}
    with the activation imatrix of the same pass, for the record."""
    from lwq_gguf.model.load import open_model
    from lwq_gguf.quant.imatrix import Imatrix, write_imatrix
    from lwq_gguf.score.fisher import streamed_fisher
    from lwq_gguf.score.sample import EVERY_ROW
    from lwq_gguf.score.scores import ScoreConfig

    cfg = ScoreConfig(fisher_tokens=fisher_tokens, device="cpu")
    run = streamed_fisher(open_model(model_dir), cfg, True, EVERY_ROW)
    sums, agree = dict(run.imatrix.sums), {}
    for ft in run.tensors:
        if ft.name not in sums or ft.experts > 1:
            continue
        col = (ft.fisher.astype(np.float64) * ft.row_weights[:, None]).sum(0)
        act = run.imatrix.weights(ft.name).astype(np.float64)
        col *= act.sum() / max(col.sum(), 1e-30)  # the same total: only the shape differs
        n = float(np.asarray(run.imatrix.counts[ft.name]).reshape(-1)[0])
        sums[ft.name] = col * n
        agree[ft.name] = float(np.corrcoef(np.log(col + 1e-30), np.log(act + 1e-30))[0, 1])
    write_imatrix(Imatrix(sums, run.imatrix.counts, "fisher:" + run.imatrix.dataset,
                          run.imatrix.chunk_size, run.imatrix.chunks), path)
    return agree


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--mixes", default="Q3_K_M,Q4_K_S,Q4_K_M,IQ4_XS")
    ap.add_argument("--fisher-tokens", type=int, default=4096)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--text", type=Path, default=WIKI)
    ap.add_argument("--results", type=Path, default=RESULTS / "fisher-probe.json")
    a = ap.parse_args()
    from lwq_gguf.evaluate.perplexity import EvalConfig, evaluate_many

    t0 = time.time()
    name = a.model.resolve().name
    src = ROOT / "out" / "quality" / name / "imatrix-auto"
    base = src / "gguf" / f"{name}-F16.gguf"
    if not base.is_file() or not (src / "imatrix.gguf").is_file():
        sys.exit(f"fisher_probe: {src} has no F16 GGUF or imatrix: run bench/quality.py first")
    out = ROOT / "out" / "fisher-probe"
    out.mkdir(parents=True, exist_ok=True)
    fim = out / "imatrix-fisher.gguf"
    agree = fisher_imatrix(a.model, a.fisher_tokens, fim)
    lc = find_llama_cpp()
    files: dict[tuple[str, str, str], Path] = {}
    for mix in a.mixes.split(","):
        std = src / "gguf" / f"{name}-{mix}-imat.gguf"
        bits = size_target(std)
        files[mix, "llama.cpp", "imatrix"] = std
        files[mix, "lwq", "imatrix"] = src / "gguf" / f"{name}-lwq-auto-{bits:g}-imat.gguf"
        files[mix, "llama.cpp", "fisher"] = out / f"{mix}-fisher.gguf"
        files[mix, "lwq", "fisher"] = out / f"lwq-{bits:g}-fisher.gguf"
        run_tool([str(lc.tool("llama-quantize")), "--imatrix", str(fim), str(base),
                  str(files[mix, "llama.cpp", "fisher"]), mix], what="llama-quantize")
        subprocess.run([sys.executable, "-m", "lwq_gguf", "convert", str(a.model), "-q",
                        "--force", "--imatrix", str(fim), "--avg-bits", f"{bits:g}", "-o",
                        str(files[mix, "lwq", "fisher"])], check=True)
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        sys.exit(f"fisher_probe: missing {missing}: run bench/quality.py --imatrix auto first")
    res = evaluate_many(list(files.values()), a.text, lc, EvalConfig(ctx=512, chunks=a.chunks),
                        base=base)
    got = dict(zip(files, res))
    rows = []
    for (mix, who, im), r in got.items():
        rows.append({"mix": mix, "file": who, "importance": im, "kld": r.kld_mean,
                     "kld_err": r.kld_err, "same_top": r.same_top_pct, "ppl": r.ppl,
                     "bytes": files[mix, who, im].stat().st_size,
                     "vs_mix_imatrix": r.kld_mean / got[mix, "llama.cpp", "imatrix"].kld_mean})
    head = ("at the size of", "file", "importance", "MiB", "mean KLD", "KLD / mix (imatrix)")
    cells = [(r["mix"], r["file"], r["importance"], f"{r['bytes'] / 2**20:.2f}",
              f"{r['kld']:.4f} ± {r['kld_err']:.4f}", f"{r['vs_mix_imatrix']:.3f}") for r in rows]
    gain = {m: got[m, "lwq", "fisher"].kld_mean / got[m, "lwq", "imatrix"].kld_mean
            for m in a.mixes.split(",")}
    gain_mix = {m: got[m, "llama.cpp", "fisher"].kld_mean / got[m, "llama.cpp", "imatrix"].kld_mean
                for m in a.mixes.split(",")}
    summary = ("Fisher / llama-imatrix importance, mean KLD: llama.cpp's mixes "
               + ", ".join(f"{m} {v:.3f}" for m, v in gain_mix.items()) + "; lwq-gguf "
               + ", ".join(f"{m} {v:.3f}" for m, v in gain.items()))
    print(table(head, cells))
    print(summary)
    c = np.array(list(agree.values()))
    write_results(
        a.results,
        {"model": str(a.model), "text": str(a.text), "chunks": a.chunks,
         "fisher_tokens": a.fisher_tokens, "seconds": round(time.time() - t0), "summary": summary,
         "log_importance_correlation": {"min": float(c.min()), "median": float(np.median(c)),
                                        "max": float(c.max())}, "rows": rows},
        "Probe: Fisher-weighted importance for the encoders",
        f"{round(time.time() - t0)} s; {a.chunks} x 512 tokens of {a.text.name}; Fisher over "
        f"{a.fisher_tokens} calibration tokens; correlation of log column importances (Fisher vs "
        f"activations) per tensor: median {np.median(c):.3f}, min {c.min():.3f}\n\n"
        f"{markdown_table(head, cells)}\n\n{summary}")

if __name__ == "__main__":
    main()
