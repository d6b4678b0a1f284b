"""Convert the aligned demo model at several --avg-bits and measure each file in llama.cpp.

    .venv/bin/python bench/convert_targets.py [--chunks 20] [--strategy lim|auto]

For each target: wall time of `lwq-gguf convert` (scores computed once and reused), BPW read
back from the file, and WikiText-2 test perplexity from the pinned `llama-perplexity` (CPU,
n_ctx 512, first --chunks chunks), next to the 16-bit base and llama.cpp's own Q2_K, Q3_K_S,
Q3_K_M and Q4_K_M of the same model. Writes bench/results/convert_targets.json and prints a table.
Default: the paper's LIM strategy without imatrix (the recorded results); the KLD comparison of
the default planner is `lwq-gguf compare` / `make demo` / bench/quality.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lwq_gguf.hfconvert import converter_write  # noqa: E402
from lwq_gguf.llamacpp import find_llama_cpp, run_tool  # noqa: E402
from lwq_gguf.report import table  # noqa: E402
from lwq_gguf.verify import read_back  # noqa: E402

MODEL = ROOT / "models" / "smollm2-135m-k256"
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def perplexity(lc, gguf: Path, text: Path, chunks: int) -> tuple[float, float]:
    out = run_tool([str(lc.tool("llama-perplexity")), "-m", str(gguf), "-f", str(text), "-c", "512",
                    "--chunks", str(chunks), "-ngl", "0"], what="llama-perplexity")
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    return float(m.group(1)), float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=float, nargs="+", default=[3.0, 3.5, 4.25, 5.0])
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "bench")
    ap.add_argument("--strategy", default="lim", help="lim (default here: the paper's method, as "
                    "recorded in bench/results/convert_targets.json) or auto")
    ap.add_argument("--imatrix", default="none")
    a = ap.parse_args()
    if not a.text.is_file():
        sys.exit(f"convert_targets: {a.text} missing: pass --text FILE (WikiText-2 test)")
    lc = find_llama_cpp()
    a.work.mkdir(parents=True, exist_ok=True)
    lwq = [sys.executable, "-m", "lwq_gguf", "-q"]
    scores = a.work / "k256.scores.json"
    t0 = time.time()
    subprocess.run(lwq + ["score", str(MODEL), "-o", str(scores), "--force"]
                   + (["--no-sensitivity"] if a.strategy != "auto" else []), check=True,
                   stdout=subprocess.DEVNULL)
    score_s = time.time() - t0
    rows, files = [], []
    base = a.work / "k256-f16.gguf"
    (a.work / "kv.json").write_text("{}")
    converter_write(lc, MODEL, base, "f16", a.work / "kv.json")
    files.append(("F16 (base)", base, None))
    for mix in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M"):
        f = a.work / f"k256-{mix}.gguf"
        run_tool([str(lc.tool("llama-quantize")), str(base), str(f), mix], what="llama-quantize")
        files.append((f"llama.cpp {mix}", f, None))
    for target in a.targets:
        f = a.work / f"k256-lwq-{target}.gguf"
        t0 = time.time()
        subprocess.run(lwq + ["convert", str(MODEL), "--avg-bits", str(target), "--scores",
                              str(scores), "-o", str(f), "--force", "--strategy", a.strategy,
                              "--imatrix", a.imatrix], check=True,
                       stdout=subprocess.DEVNULL)
        files.append((f"lwq-gguf --avg-bits {target}", f, time.time() - t0))
    results = []
    for name, f, secs in files:
        ppl, err = perplexity(lc, f, a.text, a.chunks)
        info = read_back(f)
        results.append({"file": name, "bpw": round(info.bpw, 4), "mib": round(f.stat().st_size / 2**20, 2),
                        "ppl": ppl, "ppl_err": err, "convert_s": round(secs, 1) if secs else None})
        rows.append((name, f"{info.bpw:.3f}", f"{f.stat().st_size / 2**20:.1f}", f"{ppl:.3f} ± {err:.3f}",
                     f"{secs:.0f}" if secs else "-"))
    machine = f"{platform.machine()}, {subprocess.getoutput('nproc')} cores, " + \
        subprocess.getoutput("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    out = {"model": str(MODEL.relative_to(ROOT)), "text": a.text.name, "chunks": a.chunks,
           "ctx": 512, "score_s": round(score_s, 1), "machine": machine, "results": results}
    (ROOT / "bench" / "results" / "convert_targets.json").write_text(json.dumps(out, indent=1))
    print(table(("file", "BPW", "MiB", f"PPL ({a.chunks}x512)", "convert s"), rows))
    print(f"scoring: {score_s:.0f} s (reused by every target); machine: {machine}")


if __name__ == "__main__":
    main()
