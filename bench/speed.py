"""Scoring speed against llama-imatrix, on the same machine and the same calibration tokens.

    .venv/bin/python bench/speed.py                   # the demo model and the 1B shape
    .venv/bin/python bench/speed.py --shapes demo,1b,8b

For each model: `llama-imatrix` (the pinned build, every core: -t nproc) on the model's F16 GGUF
over the packaged calibration text, --chunks N/512 of 512 tokens; then the default
`lwq-gguf score --rescore` over the first N tokens of the same text (LIM, ZD, the imatrix and
the Fisher sensitivity table a default convert uses) with an empty score cache and checksum
memo (a first run, as a user's). Both are child processes timed whole (wall clock, peak RSS
from /usr/bin/time), imports and model loading included. The F16 GGUF is made once beforehand
and not timed. The scores file's own phase clock gives the breakdown: hash (checksum of the
model files), setup (tokenizer, calibration tokens, the model's skeleton), read (weights from
disk, widened and rounded through the base GGUF's type), zd, forward (LIM and the
activations), imatrix (squared inputs), head (output layer and labels), backward (the Fisher),
list (waiting for the converter's tensor list, made meanwhile), sweeps (quantizer round trips,
CPU seconds over the worker threads) and wait (their wall time after the backward). Models:
the demo model (models/smollm2-135m-k256, f32) and random Llama models with Llama-3.2-1B /
Llama-3.1-8B shapes (bench/scale.py, bf16), and the real Gemma 3 270M (`gemma`, models/gemma3-270m
from `make models`, f32).

Writes bench/results/speed.json and speed.md (date, machine, commands, the commit measured, per
row); targets: ratio <= 4 for the demo model, the 1B shape and Gemma 3 270M, peak RSS <= 8 GB at the 8B shape.
Rows of shapes not measured in this run are kept from the existing results file, each with its
own date and commit (say --fresh to drop them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lwq_gguf.llamacpp import find_llama_cpp  # noqa: E402
from lwq_gguf.report import machine, markdown_table, table  # noqa: E402
from lwq_gguf.score.scores import default_calibration  # noqa: E402

TARGET = 4.0
RSS_8B_GB = 8.0
PHASES = ("hash", "setup", "read", "zd", "forward", "imatrix", "head", "backward", "list",
          "sweeps", "wait")


def run_timed(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds and peak RSS (GB) of a child under /usr/bin/time -v."""
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"speed: {' '.join(map(str, cmd[:3]))} ... failed:\n{p.stdout[-2000:]}\n"
                         f"{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return {"seconds": round(wall, 1), "peak_rss_gb": round(rss / 2**20, 2)}


def model_dir(shape: str) -> Path:
    if shape == "demo":
        return ROOT / "models" / "smollm2-135m-k256"
    if shape == "gemma":  # the real model (make models)
        path = ROOT / "models" / "gemma3-270m"
        if not (path / "config.json").is_file():
            raise SystemExit(f"speed: {path} is missing: run `make models`")
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
    imatrix = run_timed(im_cmd)
    print(f"speed: {shape}: llama-imatrix {imatrix['seconds']} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="lwq-speed-") as tmp:
        out = Path(tmp) / "scores.json"
        cmd = [sys.executable, "-m", "lwq_gguf", "-q", "score", model, "--rescore", "--force",
               "--calib-tokens", tokens, "--device", "cpu", "-o", out]
        ours = run_timed(cmd, {"LWQ_SCORES_CACHE": tmp})  # (also holds the checksum memo)
        sc = json.loads(out.read_text())
    phases = sc["sensitivity"]["phases"]
    ratio = round(ours["seconds"] / imatrix["seconds"], 2)
    print(f"speed: {shape}: lwq-gguf score {ours['seconds']} s ({ratio}x)", flush=True)
    return {"shape": shape, "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT)
                                         else model),
            "tokens": tokens, "fisher_tokens": sc["sensitivity"].get("fisher_tokens"),
            "llama_imatrix": {**imatrix, "command": " ".join(map(str, im_cmd))},
            "lwq_score": {**ours, "command": "lwq-gguf score MODEL --rescore --calib-tokens "
                          f"{tokens} --device cpu", "phases": phases},
            "ratio": ratio, "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "commit": commit()}


def commit() -> str:
    """The code measured: HEAD, marked when the working tree differs from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "lwq_gguf"],
                           capture_output=True, text=True).stdout.strip()
    return head + ("+changes" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="demo,1b", help="some of demo,1b,8b,gemma")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "speed")
    ap.add_argument("--fresh", action="store_true", help="drop the rows of shapes not run now")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    lc = find_llama_cpp()
    res_json = ROOT / "bench" / "results" / "speed.json"
    doc = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": machine(),
           "command": "bench/speed.py " + " ".join(sys.argv[1:]), "target_ratio": TARGET,
           "rows": []}
    shapes = a.shapes.split(",")
    if res_json.is_file() and not a.fresh:  # other shapes' rows, as they were measured
        old = json.loads(res_json.read_text())
        doc["rows"] = [{"date": old["date"], **r} for r in old.get("rows", [])
                       if r["shape"] not in shapes]
    order = ("demo", "1b", "gemma", "8b")
    for shape in shapes:
        doc["rows"].append(measure(shape, a.calib_tokens, a.work, lc))
        doc["rows"].sort(key=lambda r: order.index(r["shape"]) if r["shape"] in order else 9)
        res_json.write_text(json.dumps(doc, indent=1))  # after each model: a long run keeps it
    heads = ("model", "measured", "tokens", "llama-imatrix s", "lwq score s", "ratio",
             "peak RSS GB", *PHASES)
    rows = [(r["shape"], f"{r['date']} {r.get('commit', '?')}", r["tokens"],
             r["llama_imatrix"]["seconds"], r["lwq_score"]["seconds"],
             r["ratio"], r["lwq_score"]["peak_rss_gb"],
             *(r["lwq_score"]["phases"].get(p, "-") for p in PHASES)) for r in doc["rows"]]
    timed = [r["shape"] for r in doc["rows"] if r["shape"] in ("demo", "1b", "gemma")]
    met = all(r["ratio"] <= TARGET for r in doc["rows"] if r["shape"] in timed)
    verdict = f"ratio <= {TARGET} for {', '.join(timed)}: {'met' if met else 'NOT met'}"
    big = [r for r in doc["rows"] if r["shape"] == "8b"]
    if big:
        rss = big[0]["lwq_score"]["peak_rss_gb"]
        verdict += (f"; peak RSS at the 8B shape {rss} GB (target <= {RSS_8B_GB}): "
                    f"{'met' if rss <= RSS_8B_GB else 'NOT met'}")
    (ROOT / "bench" / "results" / "speed.md").write_text(
        "# Scoring speed: `lwq-gguf score` against `llama-imatrix`\n\n"
        f"Command: `{doc['command']}` (rows of other shapes kept from earlier runs, as dated)"
        f"\n\nMachine: {doc['machine']}; {doc['date']}; the same "
        "calibration tokens on both sides (the packaged calibration text); seconds are wall "
        "clock of the whole command, phases from the scores file (sweeps in CPU seconds).\n\n"
        + markdown_table(heads, rows) + f"\n\n{verdict}\n")
    print(table(heads, rows))
    print(verdict)
    res_json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
