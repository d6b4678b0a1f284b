"""The quality frontier: lwq-gguf against llama.cpp's mixes at each mix's own size, and smaller.

    .venv/bin/python bench/quality.py [--model DIR] [--text FILE] [--chunks 40] [--imatrix none,auto]
                                      [--no-ablation] [--results bench/results/quality.json]

A preset of `lwq-gguf compare` on models/smollm2-135m-k256-cont (the demo model with continuous
weights, as a never-quantized checkpoint has them: see models/make_smollm2.py). For each llama.cpp
mix - Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, and with an imatrix also IQ2_M, IQ3_XXS, IQ3_M,
IQ4_XS (Q5_K_M and Q6_K are measured beside them) - the mix is built and measured, then lwq-gguf
converts with --avg-bits set so that the whole file is no larger than the mix's (the mix's tensor
bytes less META_ROOM for lwq-gguf's own metadata - the plan and scores as JSON - as BPW, rounded
down; the verdict checks the bytes on disk):

* "same size": at each mix's size, without and with an imatrix on both sides (--imatrix none /
  auto: computed from the calibration text, never from the evaluation text); target KLD ratio
  (ours / mix) <= 0.55;
* "0.85x size" (with the imatrix): at 0.85x the bytes of Q3_K_M, Q4_K_S and Q4_K_M; target <= 1;
* "embedding pinned" (ablation, with the imatrix): the tied embedding/output fixed to the type the
  mix gives it (--token-embedding-type), so that the ratio shows what the repeating layers gain;
* "estimated": the same ratio by the planner's own estimate (the measured damage of each tensor's
  type, summed over the file), which says whether a miss is the estimate's or the type choice's.

* "sweep" (with the imatrix, --sweep STEP, default 0.25): lwq-gguf every STEP BPW over the range
  the model's tensors allow (to 8.5), for the KLD-against-size plot with the mixes on it;
* "equal KLD": for each mix, the smallest lwq-gguf file (of all the above) whose measured KLD is
  no higher than the mix's, and the bytes it saves.

Every file is evaluated against the 16-bit base on the same chunks (llama.cpp, CPU). Writes
RESULTS (.json and .md): per point the KLD ratio, same-top %, PPL, bytes on disk and how they split
between embedding/output and the layers. Files and results are cached in out/quality/MODEL/ and
shared between texts (a second text costs only its evaluations). The default RESULTS is
bench/results/quality.json for the demo model, quality-MODEL.json for another, with its plot in
docs/ (quality.png, quality-MODEL.png).

    .venv/bin/python bench/quality.py --model models/gemma3-270m --imatrix auto --no-ablation
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from harness import RESULTS, ROOT, WIKI_OR_NONE, parser, write_results

from gguf import LlamaFileType

from lwq_gguf.plan.guard import MIX_SLACK
from lwq_gguf.publish.compare import CompareConfig, run_compare, write_outputs
from lwq_gguf.evaluate.metrics import metrics
from lwq_gguf.evaluate.perplexity import EvalConfig
from lwq_gguf.model.load import open_model
from lwq_gguf.plan.config import reach_bytes
from lwq_gguf.errors import PlanError
from lwq_gguf.plan.plan import PlanConfig, make_plan
from lwq_gguf.model.inventory import model_tensors
from lwq_gguf.quant.imatrix import ImatrixChoice
from lwq_gguf.quant.types import ENCODERS, MIXES
from lwq_gguf.report import markdown_table, table
from lwq_gguf.quant.encoder import damage_key
from lwq_gguf.score.scores import Scores, ScoreConfig
from lwq_gguf.quant.gguf_file import read_back

MODEL = ROOT / "models" / "smollm2-135m-k256-cont"
KLD, TOP, PPL = metrics("kld_mean", "same_top_pct", "ppl")  # (their formats)
K_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M")
IQ_MIXES = ("IQ2_M", "IQ3_XXS", "IQ3_M", "IQ4_XS")  # need an imatrix (IQ2_M, IQ3_XXS)
MEASURED = ("Q5_K_M", "Q6_K")  # baselines measured beside them, no point of ours
SMALLER, SHRINK = ("Q3_K_M", "Q4_K_S", "Q4_K_M"), 0.85
META_ROOM = 32 << 10  # bytes: lwq.plan + lwq.scores, which llama.cpp's files do not carry
EMBED = ("token_embd.weight", "output.weight")
TARGET_SAME, TARGET_SMALLER = 0.55, 1.0
# A model rebuilt from a quantized file: the mixes that keep its own grids (their fallbacks
# rebuild them) are reported without a target; the others have the targets
SOURCE_GRIDS = {"gemma3-270m": {"exempt": ("Q3_K_L", "Q4_K_S", "Q4_K_M"), "typical": 0.6,
                                "cap": 0.8, "bytes": (("Q3_K_M", "IQ3_M", "IQ4_XS"), 0.8)}}


def size_target(mix_file: Path, scale: float = 1.0) -> float:
    """--avg-bits that keeps our file within ``scale`` x ``mix_file`` on disk (same model)."""
    info = read_back(mix_file)
    limit = mix_file.stat().st_size * scale - (mix_file.stat().st_size - info.nbytes)
    return math.floor((limit - META_ROOM) * 8 / info.nelements * 1000) / 1000


def byte_split(path: Path) -> tuple[int, int]:
    """(bytes of token_embd + output, bytes of every other tensor) of a GGUF."""
    from gguf import GGUFReader

    emb = other = 0
    for t in GGUFReader(str(path)).tensors:
        if t.name in EMBED:
            emb += int(t.n_bytes)
        else:
            other += int(t.n_bytes)
    return emb, other


def estimate(types: dict[str, str], damage: dict) -> float:
    """The planner's own estimate of a file's KLD: the sum over its tensors of the measured
    per-type damage (Fisher-weighted quantization error, lwq-gguf's Q4_K encoder) of the type the
    file gives each tensor. For a llama.cpp mix it says what the planner thinks that recipe costs."""
    return sum(damage[n][ty] for n, ty in types.items() if n in damage)


def _row(point: str, imatrix: str, mix: str, bits: float, limit: float, a, b, base_ppl: float,
         out: Path, damage: dict) -> dict:
    ea, la = byte_split(out / a.file)
    eb, lb = byte_split(out / b.file)
    types, mix_types = read_back(out / a.file).types, read_back(out / b.file).types
    pa, pb = estimate(types, damage), estimate(mix_types, damage)
    return {"point": point, "imatrix": imatrix, "mix": mix, "target": bits, "size_limit": limit,
            "mix_bpw": b.bpw, "ours_bpw": a.bpw, "mix_bytes": (out / b.file).stat().st_size,
            "ours_bytes": (out / a.file).stat().st_size, "mix_mib": b.size_mib,
            "ours_mib": a.size_mib, "mix_embd_bytes": eb, "mix_layer_bytes": lb,
            "ours_embd_bytes": ea, "ours_layer_bytes": la,
            "ours_embd_type": types.get("token_embd.weight"),
            "mix_embd_type": mix_types.get("token_embd.weight"),
            "mix_kld": b.result.kld_mean, "ours_kld": a.result.kld_mean,
            "kld_ratio": a.result.kld_mean / b.result.kld_mean,
            "mix_same_top": b.result.same_top_pct, "ours_same_top": a.result.same_top_pct,
            "mix_ppl": b.result.ppl, "ours_ppl": a.result.ppl, "base_ppl": base_ppl,
            "mix_estimate": pb, "ours_estimate": pa, "estimate_ratio": pa / pb,
            "ours_kept": kept(out / a.file), "chunks": a.result.chunks}


def kept(path: Path) -> str:
    """What convert wrote: its plan, or (plan.guard) llama.cpp's own mix, which carries no
    lwq.* keys."""
    info = read_back(path)
    if "lwq.plan" in info.metadata:
        return "plan"
    ftype = int(info.metadata.get("general.file_type", -1))
    return next((m for m in MIXES if int(LlamaFileType[f"MOSTLY_{m}"]) == ftype), "mix")


def planned(model: Path, targets, imatrix: bool, scores: Path, mix_bpw: dict[str, float]
            ) -> tuple[tuple[float, ...], dict[float, float]]:
    """The targets the planner accepts, and for each the smallest target with the same plan and
    the same llama.cpp mixes within its budget (``mix_bpw``: the mixes convert sets beside the
    plan, plan.guard): files that would be byte-identical are built and measured once."""
    tensors = model_tensors(open_model(model))
    sc = Scores.from_json(scores.read_text())
    damage = sc.damage(damage_key("auto" if imatrix else "none", "lwq"))
    ok, first = [], {}
    for bits in sorted(set(targets)):
        try:
            types = make_plan(tensors, sc.n_layers, PlanConfig(avg_bits=bits), damage=damage).types
        except PlanError:
            continue
        ok.append(bits)
        key = (types, tuple(sorted(m for m, b in mix_bpw.items() if b <= bits + MIX_SLACK)))
        first.setdefault(key, bits)
        first[bits] = first[key]
    return tuple(ok), {b: first[b] for b in ok}


def sweep_range(model: Path, step: float, imatrix: bool) -> tuple[float, ...]:
    """Every ``step`` BPW the default ladder reaches on ``model`` (whole file), up to 8.5 (above
    the largest file worth making - each tensor at the largest type that still lowers its
    damage - the planner refuses: :func:`planned` drops those)."""
    tensors = model_tensors(open_model(model))
    total = sum(t.numel for t in tensors)
    lo, hi = (b * 8 / total for b in reach_bytes(tensors, PlanConfig(avg_bits=4.0), imatrix))
    first = math.ceil((lo + 0.01) / step) * step
    return tuple(round(first + k * step, 3) for k in range(int((min(hi, 8.5) - first) / step) + 1))


def _point(point: str, imatrix: str, bits: float, r, out: Path, damage: dict) -> dict:
    """A sweep point: one lwq-gguf file, no mix beside it."""
    types = read_back(out / r.file).types
    return {"point": point, "imatrix": imatrix, "mix": None, "target": bits,
            "ours_bpw": r.bpw, "ours_bytes": (out / r.file).stat().st_size, "ours_mib": r.size_mib,
            "ours_kld": r.result.kld_mean, "ours_same_top": r.result.same_top_pct,
            "ours_ppl": r.result.ppl, "ours_estimate": estimate(types, damage),
            "ours_embd_type": types.get("token_embd.weight"), "ours_kept": kept(out / r.file),
            "chunks": r.result.chunks}


def equal_kld(rows: list[dict]) -> list[dict]:
    """For each mix (same-size rows), the smallest lwq-gguf file of any point whose KLD is no
    higher than the mix's, and the bytes it saves against the mix."""
    out = []
    for r in rows:
        if r["point"] != "same size":
            continue
        ours = [(x["ours_bytes"], x["ours_kld"], x["target"]) for x in rows
                if x["imatrix"] == r["imatrix"] and x["ours_kld"] <= r["mix_kld"]
                and not x["point"].startswith("embedding pinned")]
        best = min(ours, default=None)
        out.append({"imatrix": r["imatrix"], "mix": r["mix"], "mix_bytes": r["mix_bytes"],
                    "mix_kld": r["mix_kld"], "ours_bytes": best and best[0],
                    "ours_kld": best and best[1], "ours_target": best and best[2],
                    "bytes_ratio": best and best[0] / r["mix_bytes"]})
    return out


def run(text: Path, chunks: int, out_root: Path, imatrix: str, encoder: str = "lwq",
        model: Path = MODEL, ablation: bool = True, step: float = 0.0) -> list[dict]:
    out = out_root / f"imatrix-{imatrix}"
    out_root.mkdir(parents=True, exist_ok=True)
    with_im = imatrix != "none"
    mixes = K_MIXES + (IQ_MIXES if with_im else ())
    cfg = CompareConfig(model=model, out_dir=out, text=text, targets=(),
                        plan=PlanConfig(avg_bits=4.0, encoder=encoder),
                        baselines=mixes + MEASURED, imatrix=ImatrixChoice.parse(imatrix),
                        score=ScoreConfig(device="cpu"),
                        eval=EvalConfig(ctx=512, chunks=chunks, device="cpu"))
    built = {r.label: r for r in run_compare(cfg).rows if r.kind == "llama.cpp"}
    points = [("same size", m, 1.0) for m in mixes]
    if with_im:
        points += [(f"{SHRINK:g}x size", m, SHRINK) for m in SMALLER]
    bits = {(p, m): size_target(out / built[m].file, k) for p, m, k in points}
    sweep = sweep_range(model, step, with_im) if step and with_im else ()
    mix_bpw = {m: read_back(out / built[m].file).bpw for m in built}
    accepted, same = planned(model, set(bits.values()) | set(sweep), with_im, out / "scores.json",
                             mix_bpw)
    sweep = tuple(b for b in sweep if b in accepted)
    c = replace(cfg, targets=tuple(sorted(set(same.values()))),
                plan=PlanConfig(avg_bits=min(bits.values()), encoder=encoder))
    res = run_compare(c)
    write_outputs(c, res, f"bench/quality.py (imatrix {imatrix})")
    ours = {b: r for r in res.rows if r.kind == "lwq-gguf" for b in same
            if r.label == f"lwq {same[b]:g}"}
    final = {r.label: r for r in res.rows if r.kind == "llama.cpp"}
    damage = Scores.from_json((out / "scores.json").read_text()).damage(
        damage_key(c.imatrix.key, encoder))
    rows = [_row(p, imatrix, m, bits[p, m], k, ours[bits[p, m]], final[m],
                 res.base.result.ppl, out, damage) for p, m, k in points]
    rows += [_point("sweep", imatrix, b, ours[b], out, damage) for b in sweep]
    if ablation and with_im:  # the embedding/output pinned to the mix's own type
        pinned: dict[str, list[str]] = {}
        for m in mixes:
            pinned.setdefault(read_back(out / final[m].file).types["token_embd.weight"], []).append(m)
        for ty, ms in sorted(pinned.items()):
            c = replace(cfg, baselines=(), targets=tuple(sorted({bits["same size", m] for m in ms})),
                        plan=PlanConfig(avg_bits=bits["same size", ms[0]], encoder=encoder,
                                        token_embedding_type=ty))
            r = {x.label: x for x in run_compare(c).rows if x.kind == "lwq-gguf"}
            rows += [_row(f"embedding pinned ({ty})", imatrix, m, bits["same size", m], 1.0,
                          r[f"lwq {bits['same size', m]:g}"], final[m], res.base.result.ppl, out,
                          damage)
                     for m in ms]
    return rows


def _worst(rows: list[dict], label: str, target: float | None = None) -> str:
    """The point of ``rows`` with the highest KLD ratio, as one verdict line."""
    worst = max(rows, key=lambda r: r["kld_ratio"])
    line = (f"{label}: max KLD ratio {worst['kld_ratio']:.3f} ({worst['mix']}; the planner's own "
            f"estimate {worst['estimate_ratio']:.3f}) over {len(rows)} mixes")
    if target is None:
        return line
    return f"{line} (target <= {target}): {'met' if worst['kld_ratio'] <= target else 'MISSED'}"


def verdict(rows: list[dict], model: str, same_kld: list[dict]) -> list[str]:
    """One line per target of the issue, with its measured worst case."""
    lines = []
    grids = SOURCE_GRIDS.get(model)
    for imatrix in ("none", "auto"):
        same = [r for r in rows if r["point"] == "same size" and r["imatrix"] == imatrix]
        if not same:
            continue
        lines.append(_worst(same, f"same size, imatrix {imatrix}, never worse than the mix", 1.0))
        if grids is None:
            lines.append(_worst(same, f"same size, imatrix {imatrix}", TARGET_SAME))
            continue
        free = [r for r in same if r["mix"] not in grids["exempt"]]
        lines.append(_worst(free, f"same size, imatrix {imatrix}, mixes leaving the source's "
                            "grids", grids["cap"]))
        n = sum(r["kld_ratio"] <= grids["typical"] for r in free)
        lines.append(f"same size, imatrix {imatrix}: {n} of {len(free)} at <= "
                     f"{grids['typical']}x the mix's KLD")
        names, cap = grids["bytes"]
        eq = [e for e in same_kld if e["imatrix"] == imatrix and e["mix"] in names]
        worst = max((e["bytes_ratio"] or math.inf for e in eq), default=math.inf)
        lines.append(f"equal KLD, imatrix {imatrix}: bytes vs the mix for {', '.join(names)} "
                     f"at most {worst:.3f} (target <= {cap}): "
                     f"{'met' if worst <= cap else 'MISSED'}")
    small = [r for r in rows if r["point"].endswith("x size")
             and r["mix"] not in (grids or {}).get("exempt", ())]
    if small:
        lines.append(_worst(small, f"{SHRINK:g}x size", TARGET_SMALLER))
    pinned = [r for r in rows if r["point"].startswith("embedding pinned")]
    if pinned:
        lines.append(_worst(pinned, "embedding pinned to the mix's type"))
    fits = all(r["ours_bytes"] <= r["mix_bytes"] * r["size_limit"] for r in rows if r["mix"])
    lines.append(f"every file within its size limit (bytes on disk): {fits}")
    return lines


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--text", type=Path, default=WIKI_OR_NONE)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--imatrix", default="none,auto")
    ap.add_argument("--no-ablation", action="store_true", help="skip the embedding-pinned points")
    ap.add_argument("--encoder", default="lwq", choices=ENCODERS,
                    help="our files' encoder (ggml: llama-quantize's Q4_K blocks)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "quality")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--sweep", type=float, default=0.25, metavar="STEP",
                    help="lwq-gguf every STEP BPW over the model's range (with the imatrix; 0: none)")
    a = ap.parse_args()
    name = a.model.resolve().name
    if a.results is None:
        default = MODEL.resolve().name == name
        a.results = RESULTS / ("quality.json" if default else f"quality-{name}.json")
    if a.text is None:
        ap.error("--text FILE is needed (WikiText-2 test is not in ../shared here)")
    t0 = time.time()
    rows = []
    for imatrix in a.imatrix.split(","):
        rows += run(a.text, a.chunks, a.out / name, imatrix, a.encoder, a.model,
                    not a.no_ablation, a.sweep)
    sweep = [r for r in rows if r["point"] == "sweep"]
    rows = [r for r in rows if r["point"] != "sweep"]
    same_kld = equal_kld(rows + sweep)
    head = ("point", "imatrix", "mix", "MiB mix/ours", "embd type mix/ours",
            "MiB embd+out mix/ours", "KLD mix", "KLD ours", "ratio", "estimated", "ours is",
            "same top mix/ours", "PPL mix/ours")
    cells = [(r["point"], r["imatrix"], r["mix"], f"{r['mix_mib']:.3f} / {r['ours_mib']:.3f}",
              f"{r['mix_embd_type']} / {r['ours_embd_type']}",
              f"{r['mix_embd_bytes'] / 2**20:.2f} / {r['ours_embd_bytes'] / 2**20:.2f}",
              KLD.fmt(r["mix_kld"]), KLD.fmt(r["ours_kld"]), f"{r['kld_ratio']:.3f}",
              f"{r['estimate_ratio']:.3f}", r["ours_kept"],
              f"{TOP.fmt(r['mix_same_top'])} / {TOP.fmt(r['ours_same_top'])}",
              f"{PPL.fmt(r['mix_ppl'])} / {PPL.fmt(r['ours_ppl'])}") for r in rows]
    lines = verdict(rows, name, same_kld)
    ehead = ("imatrix", "mix", "MiB mix", "KLD mix", "smallest lwq-gguf at <= KLD: MiB", "KLD",
             "bytes vs mix")
    ecells = [(e["imatrix"], e["mix"], f"{e['mix_bytes'] / 2**20:.2f}", KLD.fmt(e["mix_kld"]),
               "-" if e["ours_bytes"] is None else f"{e['ours_bytes'] / 2**20:.2f}",
               KLD.fmt(e["ours_kld"]),
               "-" if e["bytes_ratio"] is None else f"{e['bytes_ratio']:.3f}") for e in same_kld]
    shead = ("target BPW", "BPW", "MiB", "KLD", "estimated", "same top", "PPL", "embd type",
             "file is")
    scells = [(f"{r['target']:g}", f"{r['ours_bpw']:.3f}", f"{r['ours_mib']:.2f}",
               KLD.fmt(r["ours_kld"]), KLD.fmt(r["ours_estimate"]), TOP.fmt(r["ours_same_top"]),
               PPL.fmt(r["ours_ppl"]), r["ours_embd_type"], r["ours_kept"]) for r in sweep]
    cost = {}  # the sensitivity analysis each setting ran (cached: when it was first measured)
    for imatrix in a.imatrix.split(","):
        sens = json.loads((a.out / a.model.resolve().name / f"imatrix-{imatrix}" / "scores.json")
                          .read_text())["sensitivity"]
        cost[imatrix] = {"seconds": sens["seconds"], "types": len(sens["ladder"]),
                         "phases": sens.get("phases")}
        lines.append(f"sensitivity analysis (imatrix {imatrix}): {sens['seconds']:.0f} s for "
                     f"{len(sens['ladder'])} candidate types (target <= 600 s)")
    print(table(head, cells))
    print(table(ehead, ecells))
    if sweep:
        print(table(shead, scells))
    print("\n".join(lines))
    model = Path(os.path.abspath(a.model))  # (a link into the repository stays its path)
    doc = {"model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model),
           "text": str(a.text), "chunks": a.chunks, "seconds": round(time.time() - t0),
           "verdict": lines, "sensitivity": cost, "rows": rows, "equal_kld": same_kld,
           "sweep": sweep}
    write_results(
        a.results, doc, "Quality: lwq-gguf vs llama.cpp mixes",
        f"Model {doc['model']}; text {a.text.name}, {a.chunks} chunks x 512; {doc['seconds']} s"
        f"\n\n{markdown_table(head, cells)}\n\nEqual KLD:\n\n{markdown_table(ehead, ecells)}\n\n"
        + (f"Sweep:\n\n{markdown_table(shead, scells)}\n\n" if sweep else "")
        + "\n".join(f"- {x}" for x in lines))
    if a.results.name.startswith("quality") and a.results.parent == RESULTS:
        plot(json.loads(a.results.read_text()), ROOT / "docs" / a.results.with_suffix(".png").name)


def plot(doc: dict, png: Path) -> None:
    """Mean KLD against BPW from a results file: llama.cpp's mixes and lwq-gguf at their sizes,
    one pair of lines per imatrix setting (docs/quality.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for imatrix, color in (("none", "tab:red"), ("auto", "tab:blue")):
        rows = sorted((r for r in doc["rows"] if r["imatrix"] == imatrix
                       and r.get("point", "same size") == "same size"), key=lambda r: r["mix_bpw"])
        if not rows:
            continue
        ax.plot([r["mix_bpw"] for r in rows], [r["mix_kld"] for r in rows], "s--", color=color,
                label=f"llama.cpp mixes (imatrix {imatrix})")
        ax.plot([r["ours_bpw"] for r in rows], [r["ours_kld"] for r in rows], "o-", color=color,
                label=f"lwq-gguf, same size (imatrix {imatrix})")
        for r in rows:
            ax.annotate(r["mix"], (r["mix_bpw"], r["mix_kld"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        sweep = sorted((r for r in doc.get("sweep", []) if r["imatrix"] == imatrix),
                       key=lambda r: r["ours_bpw"])
        if sweep:
            ax.plot([r["ours_bpw"] for r in sweep], [r["ours_kld"] for r in sweep], ".:",
                    color=color, alpha=0.7, label=f"lwq-gguf sweep (imatrix {imatrix})")
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
