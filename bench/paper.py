"""The paper's takeaway, measured: move a growing share of layers from Q4_K to Q2_K, in LIM order,
ZD order, reverse LIM order and at random, and watch PPL and KLD against the 16-bit model.

    .venv/bin/python bench/paper.py [--text FILE] [--chunks 20] [--seeds 3] [--low q2_k|q3_k]

On models/smollm2-135m-k256 (layer scores from `lwq-gguf score --no-sensitivity`, calibration on
the packaged WikiText-2 *validation* excerpt), for share = 0, 10, ..., 100 % of the 30 decoder
layers: the least important layers under each ordering get Q2_K (--low) for all their matrices, the rest
Q4_K (token embedding Q4_K, norms F32, no imatrix). Files are made by the pinned llama-quantize
with a --tensor-type-file from the 16-bit base and all evaluated side by side against the base on
the same chunks (llama.cpp, CPU). Writes bench/results/paper.{json,md} and docs/paper.png
(paper-q3_k.* with --low q3_k).

Dumitru et al. report quality holding until 25-50 % of layers are moved with their orderings but
only 5-10 % at random; "holds" is measured here as: mean KLD at most twice that of the all-Q4_K
file (share 0).
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from pathlib import Path

from harness import RESULTS, ROOT, WIKI_OR_NONE, parser, write_results

from lwq_gguf.evaluate.perplexity import EvalConfig, evaluate_many
from lwq_gguf.files import atomic_output
from lwq_gguf.model.inventory import write_16bit
from lwq_gguf.llamacpp import find_llama_cpp, run_tool
from lwq_gguf.report import markdown_table, table
from lwq_gguf.score.scores import Scores

MODEL = ROOT / "models" / "smollm2-135m-k256"
KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
SHARES = tuple(range(0, 101, 10))


def orderings(scores: Scores, seeds: int) -> dict[str, list[int]]:
    """Layers in the order they are moved to the low type (least important first)."""
    n = scores.n_layers
    lim = sorted(range(n), key=lambda i: (scores.lim[i], i))
    out = {"LIM": lim, "ZD": sorted(range(n), key=lambda i: (scores.zd[i], i)),
           "reverse LIM": lim[::-1]}
    for s in range(seeds):
        order = list(range(n))
        random.Random(s).shuffle(order)
        out[f"random seed {s}"] = order
    return out


def types_file(moved: set[int], n_layers: int, low: str = "q2_k") -> str:
    lines = ["^token_embd\\.weight$=q4_k"]
    for i in range(n_layers):
        ty = low if i in moved else "q4_k"
        lines += [f"^blk\\.{i}\\.{k}\\.weight$={ty}" for k in KINDS]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--text", type=Path, default=WIKI_OR_NONE)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "paper")
    ap.add_argument("--low", default="q2_k", choices=["q2_k", "q3_k"], help="the type layers move to")
    a = ap.parse_args()
    if a.text is None:
        ap.error("--text FILE is needed (WikiText-2 test is not in ../shared here)")
    t0 = time.time()
    lc = find_llama_cpp()
    a.out.mkdir(parents=True, exist_ok=True)
    scores_path = a.out / "scores.json"
    if not scores_path.is_file():
        subprocess.run([sys.executable, "-m", "lwq_gguf", "-q", "score", str(MODEL), "-o",
                        str(scores_path), "--no-sensitivity", "--device", "cpu"], check=True)
    scores = Scores.from_json(scores_path.read_text())
    base = a.out / "base-f16.gguf"
    if not base.is_file():
        write_16bit(lc, MODEL, base, "f16")
    files: dict[tuple[str, int], Path] = {}
    for name, order in orderings(scores, a.seeds).items():
        for share in SHARES:
            moved = frozenset(order[: round(share / 100 * scores.n_layers)])
            key = "-".join(map(str, sorted(moved))) or "none"
            key = key if a.low == "q2_k" else f"{a.low}:{key}"
            path = a.out / f"moved-{hashlib.sha1(key.encode()).hexdigest()[:12]}.gguf"
            if not path.is_file():
                tf = a.out / "types.txt"
                tf.write_text(types_file(set(moved), scores.n_layers, a.low))
                with atomic_output(path) as tmp:
                    run_tool([str(lc.tool("llama-quantize")), "--tensor-type-file", str(tf),
                              str(base), str(tmp), "Q4_K_S"], what="llama-quantize")
            files[(name, share)] = path
    unique = sorted(set(files.values()))
    res = dict(zip(unique, evaluate_many(unique, a.text, lc, EvalConfig(ctx=512, chunks=a.chunks, device="cpu"),
                                         base)))
    rows = [{"ordering": n, "share": s, "kld": res[p].kld_mean, "kld_err": res[p].kld_err,
             "ppl": res[p].ppl, "same_top": res[p].same_top_pct} for (n, s), p in files.items()]
    curves: dict[str, dict[int, dict]] = {}
    for r in rows:
        name = "random (mean of seeds)" if r["ordering"].startswith("random") else r["ordering"]
        c = curves.setdefault(name, {}).setdefault(r["share"], {"kld": [], "ppl": []})
        c["kld"].append(r["kld"])
        c["ppl"].append(r["ppl"])
    mean = {n: {s: {k: sum(v) / len(v) for k, v in d.items()} for s, d in c.items()}
            for n, c in curves.items()}
    ref = mean["LIM"][0]["kld"]
    holds = {n: max([s for s in SHARES if all(c[t]["kld"] <= 2 * ref for t in SHARES if t <= s)],
                    default=0) for n, c in mean.items()}
    head = ["share moved"] + [f"{n} KLD / PPL" for n in mean]
    cells = [[f"{s}%"] + [f"{mean[n][s]['kld']:.4f} / {mean[n][s]['ppl']:.2f}" for n in mean]
             for s in SHARES]
    early = {n: sum(c[s]["kld"] for s in SHARES if 0 < s <= 50) / 5 for n, c in mean.items()}
    verdict = "; ".join(f"{n}: holds (KLD <= 2x all-Q4_K) up to {h}% of layers moved, mean KLD "
                        f"over 10-50 % moved {early[n]:.3f}" for n, h in holds.items())
    print(table(head, cells))
    print(verdict)
    tag = "" if a.low == "q2_k" else f"-{a.low}"
    png = ROOT / "docs" / f"paper{tag}.png"
    _plot(mean, png, a.text.name, a.chunks, a.low)
    seconds = round(time.time() - t0)
    write_results(
        RESULTS / f"paper{tag}.json",
        {"model": str(MODEL.relative_to(ROOT)), "text": str(a.text), "chunks": a.chunks,
         "low": a.low, "early_mean_kld": early, "seconds": seconds, "holds": holds,
         "verdict": verdict, "rows": rows},
        f"Moving layers from Q4_K to {a.low.upper()} (bench/paper.py --low {a.low})",
        f"{a.text.name}, {a.chunks} chunks x 512; {seconds} s\n\n{markdown_table(head, cells)}"
        f"\n\n{verdict}\n\n![](../../docs/{png.name})")
    print(f"plot: docs/{png.name}")

def _plot(mean: dict, png: Path, text: str, chunks: int, low: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=90)
    for name, c in mean.items():
        xs = sorted(c)
        ax1.plot(xs, [c[x]["kld"] for x in xs], "o-", ms=3, label=name)
        ax2.plot(xs, [c[x]["ppl"] for x in xs], "o-", ms=3, label=name)
    ax1.set_yscale("log")
    ax2.set_yscale("log")
    for ax, what in ((ax1, "mean KLD vs 16-bit"), (ax2, "perplexity")):
        ax.set_xlabel(f"% of layers moved Q4_K -> {low.upper()}")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M (k256): {text}, {chunks} chunks x 512, llama.cpp CPU", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    main()
