"""The damage model against the truth: single-tensor KLD measured in llama.cpp, beside the estimate.

    .venv/bin/python bench/truth.py [--model models/gemma3-270m] [--text FILE] [--chunks 4]
                                    [--per-kind 3] [--ladder all] [--results FILE]

For a sample of (tensor, type) pairs - at least ``--per-kind`` tensors of every kind (attn_q,
attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down; layers spread first to last) plus the
token embedding (and the output when it is not tied), each with every type the ladder gives it
(llama.cpp's fallback where its rows do not fit) - one file is built with that tensor in that
type and every other tensor left as the 16-bit base has it (``llama-quantize --tensor-type-file``
from the base, ggml's encoders, the imatrix computed from the calibration text), and its mean KLD
against the base is measured in llama.cpp on the evaluation text. Beside it: the planner's
estimate for the same pair, damage(t, q) = 1/2 sum F (w - Q(w))^2 (the sensitivity table of the
same encoder and imatrix).

Writes RESULTS (.json, .md): every pair, per type the rank (Spearman) correlation of estimate and
measurement over the tensors and the median measured / estimated ratio, and the worst over- and
under-estimates. Pairs are measured in batches and kept in OUT/pairs.json as they finish, so a
stopped run resumes where it was. ``--carry FILE`` starts OUT/pairs.json from an earlier results
file of the same model, text and chunks (a machine whose out/ is gone): a carried pair is kept only
where its estimate is within 5 % of the one recomputed now (the same scores up to float summation
order) and takes today's estimate; the results say how many pairs were carried and from which run.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np

from harness import RESULTS, ROOT, WIKI_OR_NONE, parser, write_results

from lwq_gguf.publish.compare import CompareConfig, run_compare
from lwq_gguf.evaluate.perplexity import EvalConfig, evaluate_many
from lwq_gguf.files import atomic_write_text
from lwq_gguf.llamacpp import find_llama_cpp, run_tool
from lwq_gguf.plan.plan import PlanConfig
from lwq_gguf.quant.encoder import damage_key
from lwq_gguf.quant.imatrix import ImatrixChoice
from lwq_gguf.quant.types import QUANT_TYPES
from lwq_gguf.report import markdown_table, table
from lwq_gguf.score.scores import Scores, ScoreConfig

MODEL = ROOT / "models" / "gemma3-270m"
KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
BATCH = 6  # files built, then measured side by side (each is a whole 16-bit model)


def sample_tensors(names: list[str], n_layers: int, per_kind: int) -> list[str]:
    """``per_kind`` layers of every kind, spread from the first to the last, and the embedding /
    output tensors."""
    layers = sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, per_kind)})
    # the middle layer of every kind first, then the first, the last, ...: a run stopped early
    # (--report) still covers every kind
    layers.sort(key=lambda i: (abs(i - (n_layers - 1) / 2), i))
    out = [n for n in ("token_embd.weight", "output.weight") if n in names]
    for i in layers:
        out += [f"blk.{i}.{kind}.weight" for kind in KINDS if f"blk.{i}.{kind}.weight" in names]
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    c = np.corrcoef(ra, rb)[0, 1]
    return None if math.isnan(c) else float(c)


def build(lc, base: Path, imatrix: Path, quantizable: list[str], name: str, ty: str,
          out: Path) -> None:
    """``base`` with ``name`` in ``ty`` and every other quantizable tensor kept 16-bit."""
    keep = "f16"
    lines = [f"^{re.escape(name)}$={ty}"] + [f"^{re.escape(n)}$={keep}" for n in quantizable
                                             if n != name]
    types = out.with_suffix(".types.txt")
    types.write_text("\n".join(lines) + "\n")
    tmp = out.with_suffix(".partial")
    try:
        run_tool([str(lc.tool("llama-quantize")), "--imatrix", str(imatrix), "--tensor-type-file",
                  str(types), str(base), str(tmp), "Q8_0", str(os.cpu_count() or 1)],
                 what=f"llama-quantize ({name} {ty})")
        tmp.replace(out)
    finally:
        types.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def measure(a, out: Path) -> dict:
    """Every pair of the sample, measured (resuming from OUT/pairs.json)."""
    from gguf import GGUFReader

    lc = find_llama_cpp()
    cfg = CompareConfig(model=a.model, out_dir=out, text=a.text, targets=(),
                        plan=PlanConfig(avg_bits=4.0, encoder="ggml", ladder=a.ladder),
                        baselines=("Q8_0",), imatrix=ImatrixChoice.parse("auto"),
                        score=ScoreConfig(device="cpu"),
                        eval=EvalConfig(ctx=512, chunks=a.chunks, device="cpu"))
    res = run_compare(cfg)
    base = out / res.base.file
    scores = Scores.from_json((out / "scores.json").read_text())
    damage = scores.damage(damage_key("auto", "ggml"))
    reader = GGUFReader(str(base))
    quantizable = [t.name for t in reader.tensors if t.name in damage]
    del reader
    names = sample_tensors(quantizable, scores.n_layers, a.per_kind)
    pairs = [(n, ty) for n in names for ty in sorted(damage[n], key=lambda q: QUANT_TYPES[q].bpw)]
    store = out / "pairs.json"
    done = json.loads(store.read_text()) if store.is_file() else {}
    meta = out / "carried.json"  # what --carry brought in, for later --report runs
    if a.carry:
        atomic_write_text(meta, json.dumps(carry(a, done, damage)))
    carried = json.loads(meta.read_text()) if meta.is_file() else None
    todo = [] if a.report else [(n, ty) for n, ty in pairs if f"{n}:{ty}" not in done]
    print(f"truth: {len(pairs)} pairs ({len(names)} tensors), {len(todo)} to measure")
    work = out / "pairs"
    work.mkdir(exist_ok=True)
    t0 = time.time()
    for k in range(0, len(todo), BATCH):
        batch = todo[k:k + BATCH]
        files = [work / f"{n}-{ty}.gguf" for n, ty in batch]
        for (n, ty), f in zip(batch, files):
            build(lc, base, out / "imatrix.gguf", quantizable, n, ty, f)
        results = evaluate_many(files, a.text, lc, cfg.eval, base, progress=False)
        for (n, ty), f, r in zip(batch, files, results):
            done[f"{n}:{ty}"] = {"tensor": n, "type": ty, "kld": r.kld_mean, "kld_err": r.kld_err,
                                 "same_top": r.same_top_pct, "estimate": damage[n][ty]}
            f.unlink()
        atomic_write_text(store, json.dumps(done, indent=1))
        left = len(todo) - k - len(batch)
        rate = (time.time() - t0) / (k + len(batch))
        print(f"truth: {k + len(batch)}/{len(todo)} measured, ~{left * rate / 60:.0f} min left",
              flush=True)
    return {"pairs": [done[f"{n}:{ty}"] for n, ty in pairs if f"{n}:{ty}" in done],
            "sampled_pairs": len(pairs), "base_ppl": res.base.result.ppl,
            "q8_0_kld": next(r.result.kld_mean for r in res.rows if r.label == "Q8_0"),
            "carried": carried, "fisher_tokens": scores.sensitivity.get("fisher_tokens"),
            "calib_tokens": scores.sensitivity.get("tokens")}


def carry(a, done: dict, damage: dict) -> dict:
    """Pairs of an earlier results file put into ``done`` where that run measured the same
    model, text and chunks and its estimate is today's within ``CARRY_TOL`` (the same scores
    measured again differ by float summation order: a median 5e-5, at most ~3 %); a carried
    pair takes today's estimate."""
    old = json.loads(a.carry.read_text())
    same = (Path(old["model"]).name == a.model.resolve().name and old["chunks"] == a.chunks
            and Path(old["text"]).name == a.text.name)
    if not same:
        raise SystemExit(f"error: {a.carry} measured {old['model']} / {old['text']} / "
                         f"{old['chunks']} chunks, not this run's; drop --carry")
    kept = skipped = 0
    for p in old["pairs"]:
        est = damage.get(p["tensor"], {}).get(p["type"])
        if est is not None and abs(est - p["estimate"]) <= CARRY_TOL * max(abs(est), 1e-30):
            done.setdefault(f"{p['tensor']}:{p['type']}", {**p, "estimate": est, "carried": True})
            kept += 1
        else:
            skipped += 1
    print(f"truth: carried {kept} pairs from {a.carry} ({old['date']}), {skipped} not "
          "(estimate changed)")
    return {"file": a.carry.name, "date": old["date"], "machine": old.get("machine", "?"),
            "pairs": kept, "skipped": skipped}


def kind_of(name: str) -> str:
    m = re.match(r"blk\.\d+\.(\w+)\.weight", name)
    return m.group(1) if m else name.split(".")[0]


CARRY_TOL = 0.05  # --carry: an earlier pair's estimate within 5 % of today's (see carry())
FLOOR = 5  # pairs measured below FLOOR x the tensor's Q8_0 KLD: the runtime floor dominates


def relative_bias(pairs: list[dict]) -> dict[tuple[str, str], float]:
    """measured / estimated of each pair divided by the median of that ratio over the tensor's
    types: how much a type is under- (> 1) or over-estimated (< 1) against the other types of
    the same tensor, with the tensor's own Fisher error (common to its types) divided out.
    Pairs whose KLD is within FLOOR x the tensor's Q8_0 KLD are left out: there the weights sit
    on (or near) a grid of the source file and what is measured is llama.cpp's quantization of
    the activations, which the weight-error estimate does not hold."""
    floor = {p["tensor"]: p["kld"] for p in pairs if p["type"] == "q8_0"}
    live = [p for p in pairs if p["estimate"] > 0 and p["kld"] > FLOOR * floor.get(p["tensor"], 0)]
    out = {}
    for name in {p["tensor"] for p in live}:
        ps = [p for p in live if p["tensor"] == name]
        med = float(np.median([p["kld"] / p["estimate"] for p in ps]))
        out.update({(name, p["type"]): p["kld"] / p["estimate"] / med for p in ps})
    return out


def analyse(pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per type: rank correlation over tensors, median and spread of measured / estimated, and
    the median relative bias (:func:`relative_bias`)."""
    per_type = []
    rel = relative_bias(pairs)
    for ty in sorted({p["type"] for p in pairs}, key=lambda q: QUANT_TYPES[q].bpw):
        ps = [p for p in pairs if p["type"] == ty and p["estimate"] > 0]
        ratios = [p["kld"] / p["estimate"] for p in ps]
        bias = [v for (n, t), v in rel.items() if t == ty]
        per_type.append({"type": ty, "bpw": QUANT_TYPES[ty].bpw, "pairs": len(ps),
                         "spearman": spearman([p["estimate"] for p in ps], [p["kld"] for p in ps]),
                         "ratio_median": float(np.median(ratios)) if ratios else None,
                         "ratio_min": min(ratios, default=None),
                         "ratio_max": max(ratios, default=None),
                         "bias_median": float(np.median(bias)) if bias else None,
                         "bias_max": max(bias, default=None),
                         "kinds": sorted({kind_of(p["tensor"]) for p in ps})})
    live = [p for p in pairs if (p["tensor"], p["type"]) in rel]  # (runtime floor left out)
    return per_type, sorted(live, key=lambda p: p["kld"] / max(p["estimate"], 1e-12))


def carried_note(c: dict | None) -> str:
    if not c:
        return ""
    return (f" ({c['pairs']} of them carried from {c['file']} of {c['date']}, measured on "
            f"{c.get('machine', '?')} with the same model, text and chunks, estimates within "
            f"{CARRY_TOL:.0%}; the rest measured on the machine and date above)")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--text", type=Path, default=WIKI_OR_NONE)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--per-kind", type=int, default=3)
    ap.add_argument("--ladder", default="all")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "truth")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--carry", type=Path, default=None, metavar="RESULTS",
                    help="start from the pairs of an earlier results file (checked, see above)")
    ap.add_argument("--report", action="store_true",
                    help="measure nothing more: write the results of the pairs measured so far")
    a = ap.parse_args()
    if a.text is None:
        ap.error("--text FILE is needed (WikiText-2 test is not in ../shared here)")
    name = a.model.resolve().name
    results = a.results or RESULTS / f"truth-{name}.json"
    t0 = time.time()
    (a.out / name).parent.mkdir(parents=True, exist_ok=True)
    m = measure(a, a.out / name)
    per_type, ranked = analyse(m["pairs"])
    head = ("type", "BPW", "pairs", "rank corr.", "measured/est. median", "min", "max",
            "vs the tensor's other types: median", "max")
    na = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    cells = [(r["type"], f"{r['bpw']:.3f}", r["pairs"], na(r["spearman"]),
              f"{r['ratio_median']:.3g}", f"{r['ratio_min']:.3g}", f"{r['ratio_max']:.3g}",
              na(r["bias_median"]), na(r["bias_max"])) for r in per_type if r["pairs"]]
    worst = ranked[:5] + ranked[-5:]
    whead = ("tensor", "type", "measured KLD", "estimate", "measured/est.")
    wcells = [(p["tensor"], p["type"], f"{p['kld']:.3g}", f"{p['estimate']:.3g}",
               f"{p['kld'] / max(p['estimate'], 1e-12):.2f}") for p in worst]
    allr = spearman([p["estimate"] for p in m["pairs"]], [p["kld"] for p in m["pairs"]])
    print(table(head, cells))
    print(table(whead, wcells))
    print(f"all pairs: rank correlation {allr:.3f} over {len(m['pairs'])}")
    seconds = round(time.time() - t0)
    write_results(
        results,
        {"model": str(a.model), "text": str(a.text), "chunks": a.chunks, "seconds": seconds,
         "spearman_all": allr, "per_type": per_type, **m},
        f"The damage model against single-tensor KLD: {name}",
        f"Text {a.text.name}, {a.chunks} chunks x 512 (255 scored each); {len(m['pairs'])} of "
        f"{m['sampled_pairs']} sampled pairs measured{carried_note(m['carried'])}; one tensor "
        "quantized (llama-quantize, imatrix from the calibration text), the rest 16-bit; "
        f"{seconds} s in this run\n\n"
        f"Rank correlation of estimate and measurement over all {len(m['pairs'])} pairs: "
        f"{allr:.3f}\n\n{markdown_table(head, cells)}\n\nThe five largest over-estimates (top: "
        f"the estimate above the measurement) and under-estimates (bottom), pairs within {FLOOR}x "
        f"the tensor's Q8_0 KLD (the runtime floor) left out:\n\n"
        f"{markdown_table(whead, wcells)}\n\nThe runtime floor: a tensor whose weights already "
        f"sit on the type's grid (a model rebuilt from a quantized file: Gemma 3 270M's layers on "
        f"Q5_0, Q4_K and Q8_0) is estimated at ~0, yet costs 1e-5-3e-5 in llama.cpp, which "
        f"quantizes the activations of a quantized matmul (Q8_0, Q8_1 or Q8_K blocks by type).")

if __name__ == "__main__":
    main()
