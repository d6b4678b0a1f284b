"""Scoring speed against llama-imatrix, on the same machine and the same calibration tokens.

    .venv/bin/python bench/speed.py                   # the demo model and the 1B shape
    .venv/bin/python bench/speed.py --shapes demo,1b,8b

For each model: `llama-imatrix` (the pinned build, every core: -t nproc) on the model's F16 GGUF
over the packaged calibration text, --chunks N/512 of 512 tokens; then the default
`lwq-gguf score --rescore` over the first N tokens of the same text (LIM, ZD, the imatrix and
the Fisher sensitivity table a default convert uses) with an empty score cache and checksum
memo (a first run, as a user's). Both are child processes timed whole (wall clock, peak RSS
from wait4), imports and model loading included. The F16 GGUF is made once beforehand
and not timed. The scores file's own phase clock gives the breakdown: hash (checksum of the
model files), setup (tokenizer, calibration tokens, the model's skeleton), read (weights from
disk, widened and rounded through the base GGUF's type), zd, forward (LIM and the
activations), imatrix (squared inputs), head (output layer and labels), backward (the Fisher),
list (waiting for the converter's tensor list, made meanwhile), sweeps (quantizer round trips,
CPU seconds over the worker threads) and wait (their wall time after the backward). Models:
the demo model (models/smollm2-135m-k256, f32) and random Llama models with Llama-3.2-1B /
Llama-3.1-8B shapes (bench/scale.py, bf16), and the real Gemma 3 270M (`gemma`, models/gemma3-270m
from `make models`, f32) and Qwen2.5-Coder-1.5B-Instruct (`qwen`, models/qwen2.5-coder-1.5b
from models/make_qwen25coder.py, bf16: a real model none of the defaults were tuned on).

Writes bench/results/speed.json and speed.md (date, machine, commands, the commit measured, per
row); targets: ratio <= 2.5 for the demo model, the 1B shape and the real models, peak RSS
<= 8 GB at the 8B shape.
Rows of shapes not measured in this run are kept from the existing results file, each with its
own date and commit (say --fresh to drop them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import RESULTS, ROOT, commit, parser, run_child, today, write_results

from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.report import markdown_table, table
from lwq_gguf.score.scores import default_calibration

TARGET = 2.5
RSS_8B_GB = 8.0
PHASES = ("hash", "setup", "read", "zd", "forward", "imatrix", "head", "backward", "list",
          "sweeps", "wait")


def model_dir(shape: str) -> Path:
    if shape == "demo":
        return ROOT / "models" / "smollm2-135m-k256"
    if shape == "gemma":  # the real model (make models)
        path = ROOT / "models" / "gemma3-270m"
        if not (path / "config.json").is_file():
            raise SystemExit(f"speed: {path} is missing: run `make models`")
        return path
    if shape == "qwen":  # a real model none of the defaults were tuned on (not in make models)
        path = ROOT / "models" / "qwen2.5-coder-1.5b"
        if not (path / "config.json").is_file():
            raise SystemExit(f"speed: {path} is missing: run `.venv/bin/python "
                             "models/make_qwen25coder.py models`")
        return path
    from scale import generate

    return generate(shape)


def base_gguf(lc, model: Path, work: Path) -> Path:
    """The model's F16 GGUF for llama-imatrix (made once, not timed)."""
    out = work / f"{model.name}-f16.gguf"
    if not out.is_file():
        tmp = out.with_suffix(".partial")
        subprocess.run([sys.executable, str(lc.src / "convert_hf_to_gguf.py"), str(model),
                        "--outtype", "f16", "--outfile", str(tmp)], check=True,
                       capture_output=True)
        tmp.rename(out)
    return out


def measure(shape: str, tokens: int, work: Path, lc) -> dict:
    model = model_dir(shape)
    base = base_gguf(lc, model, work)
    calib = default_calibration()
    threads = os.cpu_count() or 1
    im_cmd = [lc.tool("llama-imatrix"), "-m", base, "-f", calib, "-c", 512, "--chunks",
              tokens // 512, "-t", threads, "-o", work / f"{shape}.imatrix.gguf"]
    imatrix = run_child(im_cmd, who="speed")
    print(f"speed: {shape}: llama-imatrix {imatrix['seconds']} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="lwq-speed-") as tmp:
        out = Path(tmp) / "scores.json"
        cmd = [sys.executable, "-m", "lwq_gguf", "-q", "score", model, "--rescore", "--force",
               "--calib-tokens", tokens, "--device", "cpu", "-o", out]
        ours = run_child(cmd, {"LWQ_SCORES_CACHE": tmp}, "speed")  # (also holds the checksum memo)
        sc = json.loads(out.read_text())
    phases = sc["sensitivity"]["phases"]
    ratio = round(ours["seconds"] / imatrix["seconds"], 2)
    print(f"speed: {shape}: lwq-gguf score {ours['seconds']} s ({ratio}x)", flush=True)
    return {"shape": shape, "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT)
                                         else model),
            "tokens": tokens, "fisher_tokens": sc["sensitivity"].get("fisher_tokens"),
            "precision": sc["sensitivity"].get("precision", "fp32"),
            "llama_imatrix": {**imatrix, "command": " ".join(map(str, im_cmd))},
            "lwq_score": {**ours, "command": "lwq-gguf score MODEL --rescore --calib-tokens "
                          f"{tokens} --device cpu", "phases": phases},
            "ratio": ratio, "date": today(), "commit": commit()}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--shapes", default="demo,1b", help="some of demo,1b,8b,gemma,qwen")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "speed")
    ap.add_argument("--fresh", action="store_true", help="drop the rows of shapes not run now")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    lc = find_llama_cpp()
    res_json = RESULTS / "speed.json"
    doc = {"target_ratio": TARGET, "rows": []}
    shapes = a.shapes.split(",")
    if res_json.is_file() and not a.fresh:  # other shapes' rows, as they were measured
        old = json.loads(res_json.read_text())
        doc["rows"] = [{"date": old["date"], **r} for r in old.get("rows", [])
                       if r["shape"] not in shapes]
    order = ("demo", "1b", "gemma", "qwen", "8b")
    for shape in shapes:
        doc["rows"].append(measure(shape, a.calib_tokens, a.work, lc))
        doc["rows"].sort(key=lambda r: order.index(r["shape"]) if r["shape"] in order else 9)
        write(res_json, doc)  # after each model: a long run keeps what it measured


def write(res_json: Path, doc: dict) -> None:
    heads = ("model", "measured", "tokens", "matmuls", "llama-imatrix s", "lwq score s", "ratio",
             "peak RSS GB", *PHASES)
    rows = [(r["shape"], f"{r['date']} {r.get('commit', '?')}", r["tokens"],
             r.get("precision", "fp32"),
             r["llama_imatrix"]["seconds"], r["lwq_score"]["seconds"],
             r["ratio"], r["lwq_score"]["peak_rss_gb"],
             *(r["lwq_score"]["phases"].get(p, "-") for p in PHASES)) for r in doc["rows"]]
    timed = [r["shape"] for r in doc["rows"] if r["shape"] in ("demo", "1b", "gemma", "qwen")]
    met = all(r["ratio"] <= TARGET for r in doc["rows"] if r["shape"] in timed)
    verdict = f"ratio <= {TARGET} for {', '.join(timed)}: {'met' if met else 'NOT met'}"
    big = [r for r in doc["rows"] if r["shape"] == "8b"]
    if big:
        rss = big[0]["lwq_score"]["peak_rss_gb"]
        verdict += (f"; peak RSS at the 8B shape {rss} GB (target <= {RSS_8B_GB}): "
                    f"{'met' if rss <= RSS_8B_GB else 'NOT met'}")
    print(table(heads, rows))
    print(verdict)
    write_results(res_json, {**doc, "verdict": verdict},
                  "Scoring speed: `lwq-gguf score` against `llama-imatrix`",
                  "Rows of shapes not run by this command are kept from earlier runs, as dated. "
                  "The same calibration tokens on both sides (the packaged calibration text); "
                  "seconds are wall clock of the whole command, phases from the scores file "
                  f"(sweeps in CPU seconds).\n\n{markdown_table(heads, rows)}\n\n{verdict}")

if __name__ == "__main__":
    main()
