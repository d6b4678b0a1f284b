"""The quality frontier: lwq-gguf against llama.cpp's mixes at each mix's own size.

    .venv/bin/python bench/quality.py [--text FILE] [--chunks 40] [--strategies auto,lim,zd,random]

A preset of `lwq-gguf compare` on models/smollm2-135m-k256: for each llama.cpp mix Q2_K, Q3_K_S,
Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, the mix is built and measured, then lwq-gguf converts with
--avg-bits set so that the whole file is no larger than the mix's (the mix's tensor bytes less
META_ROOM for lwq-gguf's own metadata - the plan and scores as JSON, ~21 KiB here - as BPW,
rounded down; the verdict checks the file sizes), without and with an
imatrix on both sides (--imatrix none / auto: computed from the calibration text, never from the
evaluation text). Every file is evaluated against the 16-bit base on the same chunks (llama.cpp,
CPU). Writes bench/results/quality.json and quality.md: per point the KLD ratio (ours / llama.cpp),
same-top %, PPL and size. Files and results are cached in out/quality/ (rerunning is cheap).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lwq_gguf.evaluate.compare import CompareConfig, run_compare, write_outputs  # noqa: E402
from lwq_gguf.evaluate.perplexity import EvalConfig  # noqa: E402
from lwq_gguf.plan.plan import PlanConfig  # noqa: E402
from lwq_gguf.quant.imatrix import ImatrixChoice  # noqa: E402
from lwq_gguf.quant.types import ENCODERS  # noqa: E402
from lwq_gguf.report import machine, markdown_table, table  # noqa: E402
from lwq_gguf.score.scores import ScoreConfig  # noqa: E402
from lwq_gguf.write.verify import read_back  # noqa: E402

MODEL = ROOT / "models" / "smollm2-135m-k256"
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M")
META_ROOM = 32 << 10  # bytes: lwq.plan + lwq.scores, which llama.cpp's files do not carry


def size_target(mix_file: Path) -> float:
    """--avg-bits that keeps our file no larger than ``mix_file`` (same model, same vocab)."""
    info = read_back(mix_file)
    return math.floor((info.nbytes - META_ROOM) * 8 / info.nelements * 1000) / 1000


def run(text: Path, chunks: int, strategies: list[str], out_root: Path, imatrix: str,
        encoder: str = "lwq", model: Path = MODEL, mixes: tuple[str, ...] = MIXES) -> list[dict]:
    out = out_root / f"imatrix-{imatrix}"
    out_root.mkdir(parents=True, exist_ok=True)
    cfg = CompareConfig(model=model, out_dir=out, text=text, targets=(),
                        plan=PlanConfig(avg_bits=4.0), baselines=mixes,
                        imatrix=ImatrixChoice.parse(imatrix), score=ScoreConfig(device="cpu"),
                        eval=EvalConfig(ctx=512, chunks=chunks, device="cpu"))
    built = {r.label: r for r in run_compare(cfg).rows if r.kind == "llama.cpp"}
    targets = tuple(size_target(out / built[m].file) for m in mixes)
    rows = []
    for strategy in strategies:
        c = replace(cfg, targets=targets,
                    plan=PlanConfig(avg_bits=targets[0], strategy=strategy, encoder=encoder))
        res = run_compare(c)
        write_outputs(c, res, f"bench/quality.py (imatrix {imatrix}, strategy {strategy})")
        ours = {r.label: r for r in res.rows if r.kind == "lwq-gguf"}
        final = {r.label: r for r in res.rows if r.kind == "llama.cpp"}  # (rebuilt when the
        # scores, and so the imatrix both sides use, were measured again)
        for m, bits in zip(mixes, targets):
            a, b = ours[f"lwq {bits:g}"], final[m]
            rows.append({"imatrix": imatrix, "strategy": strategy, "encoder": encoder, "mix": m,
                         "target": bits,
                         "mix_bpw": b.bpw, "ours_bpw": a.bpw, "mix_bytes": (out / b.file).stat().st_size,
                         "ours_bytes": (out / a.file).stat().st_size, "mix_mib": b.size_mib,
                         "ours_mib": a.size_mib, "mix_kld": b.result.kld_mean,
                         "ours_kld": a.result.kld_mean, "kld_ratio": a.result.kld_mean /
                         b.result.kld_mean, "mix_same_top": b.result.same_top_pct,
                         "ours_same_top": a.result.same_top_pct, "mix_ppl": b.result.ppl,
                         "ours_ppl": a.result.ppl, "base_ppl": res.base.result.ppl,
                         "chunks": a.result.chunks})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=WIKI if WIKI.is_file() else None)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--strategies", default="auto")
    ap.add_argument("--imatrix", default="none,auto")
    ap.add_argument("--encoder", default="lwq", choices=ENCODERS,
                    help="our files' encoder (ggml: llama-quantize's Q4_K blocks)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "quality")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    a = ap.parse_args()
    if a.text is None:
        ap.error("--text FILE is needed (WikiText-2 test is not in ../shared here)")
    t0 = time.time()
    rows = []
    for imatrix in a.imatrix.split(","):
        rows += run(a.text, a.chunks, a.strategies.split(","), a.out / a.text.stem, imatrix,
                    a.encoder)
    head = ("imatrix", "strategy", "mix", "BPW mix/ours", "MiB mix/ours", "KLD mix", "KLD ours",
            "ratio", "same top mix/ours", "PPL mix/ours")
    cells = [(r["imatrix"], r["strategy"], r["mix"], f"{r['mix_bpw']:.3f} / {r['ours_bpw']:.3f}",
              f"{r['mix_mib']:.3f} / {r['ours_mib']:.3f}", f"{r['mix_kld']:.4f}",
              f"{r['ours_kld']:.4f}", f"{r['kld_ratio']:.3f}",
              f"{r['mix_same_top']:.1f} / {r['ours_same_top']:.1f}",
              f"{r['mix_ppl']:.2f} / {r['ours_ppl']:.2f}") for r in rows]
    auto = [r for r in rows if r["strategy"] == "auto"]
    verdict = (f"auto: max KLD ratio {max(r['kld_ratio'] for r in auto):.3f} over {len(auto)} "
               f"points (target <= 0.8); every file no larger than its mix (bytes on disk): "
               f"{all(r['ours_bytes'] <= r['mix_bytes'] for r in auto)}") if auto else ""
    print(table(head, cells))
    print(verdict)
    doc = {"model": str(MODEL.relative_to(ROOT)), "text": str(a.text), "chunks": a.chunks,
           "date": time.strftime("%Y-%m-%d"), "machine": machine(), "seconds": round(time.time() - t0), "verdict": verdict,
           "command": "bench/quality.py " + " ".join(sys.argv[1:]), "rows": rows}
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(json.dumps(doc, indent=1))
    a.results.with_suffix(".md").write_text(
        f"# Quality: lwq-gguf vs llama.cpp mixes at equal size\n\nCommand: `{doc['command']}`\n\n"
        f"Machine: {doc['machine']}; text {a.text.name}, {a.chunks} chunks x 512; "
        f"{doc['seconds']} s\n\n{markdown_table(head, cells)}\n\n{verdict}\n")
    if a.results.name == "quality.json":
        plot(doc, ROOT / "docs" / "quality.png")
    print(f"wrote {a.results} and {a.results.with_suffix('.md')}")


def plot(doc: dict, png: Path) -> None:
    """Mean KLD against BPW from a results file: llama.cpp's mixes and lwq-gguf at their sizes,
    one pair of lines per imatrix setting (docs/quality.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for imatrix, color in (("none", "tab:red"), ("auto", "tab:blue")):
        rows = sorted((r for r in doc["rows"] if r["imatrix"] == imatrix
                       and r["strategy"] == "auto"), key=lambda r: r["mix_bpw"])
        if not rows:
            continue
        ax.plot([r["mix_bpw"] for r in rows], [r["mix_kld"] for r in rows], "s--", color=color,
                label=f"llama.cpp mixes (imatrix {imatrix})")
        ax.plot([r["ours_bpw"] for r in rows], [r["ours_kld"] for r in rows], "o-", color=color,
                label=f"lwq-gguf, same size (imatrix {imatrix})")
        for r in rows:
            ax.annotate(r["mix"], (r["mix_bpw"], r["mix_kld"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole file)")
    ax.set_ylabel("mean KL-divergence vs F16 (log)")
    ax.set_title(f"{doc['model']}: {doc['chunks']} x 512 tokens of {Path(doc['text']).name}, "
                 "llama.cpp on CPU", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plot"]:  # redraw the plot of a results file: --plot RESULTS.json PNG
        plot(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3]))
    else:
        main()
