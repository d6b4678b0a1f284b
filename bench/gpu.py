"""GPU: scoring on CUDA against the CPU path, and llama.cpp evaluation on CUDA against CPU.

Needs an NVIDIA GPU, PyTorch with CUDA and the pinned llama.cpp built with CUDA
(`LWQ_CUDA=1 vendor/build_llama_cpp.sh`, or from a tarball of vendor/pack_llama_src.sh on a
machine without a registry; point LWQ_LLAMA_CPP at the folder it prints).

    python bench/gpu.py score --shape 1b     # generated 1B-shaped Llama (bench/scale.py), 2,048 tokens
    python bench/gpu.py eval --text wiki.test.raw --chunks 40   # the demo model

score: `lwq-gguf score --rescore` on --device cuda, then on --device cpu, each a child process
(wall time, peak RSS from wait4, peak GPU memory from nvidia-smi polled every 0.2 s, less the
memory in use before it started), and a plain PyTorch forward of the same layers on each device
as the throughput reference; the two runs' LIM scores are compared.
eval: `lwq-gguf compare --device cuda` (scoring, conversion and llama.cpp on the GPU) on the
demo model, then `lwq-gguf eval --device cpu` of each of its files against the same base (the
same bytes on both backends), and one `lwq-gguf eval` on the GPU timed the same way. (On a
CUDA build llama.cpp's CPU backend still sends large-batch matrix products to the GPU, so that
"cpu" column is llama.cpp with no layers offloaded, not a CPU-only machine.)
Each stage writes its own results file, entirely from this run (date, machine, command; nothing
carried over from an earlier run): bench/results/gpu-score.json or gpu-eval.json; a table is
printed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import RESULTS, ROOT, WIKI, parser, run_child, write_results

from lwq_gguf.report import markdown_table, table

CLI = [sys.executable, "-m", "lwq_gguf", "-q"]


class GpuMemory:
    """Peak of nvidia-smi's memory.used (MiB) while the block runs, less the value before it."""

    def __init__(self) -> None:
        self.peak = self.start = None

    def __enter__(self):
        try:
            self.p = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used",
                                       "--format=csv,noheader,nounits", "-lms", "200"],
                                      stdout=subprocess.PIPE, text=True)
        except OSError:
            self.p = None
            return self
        first = self.p.stdout.readline()
        self.start = self.peak = int(first.split()[0]) if first.strip() else None
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()
        return self

    def _read(self) -> None:
        for line in self.p.stdout:
            if line.strip():
                self.peak = max(self.peak or 0, int(line.split()[0]))

    def __exit__(self, *exc) -> None:
        if self.p:
            time.sleep(0.5)
            self.p.terminate()
            self.t.join(5)

    @property
    def used_gib(self) -> float | None:
        return None if self.peak is None else round((self.peak - self.start) / 1024, 2)


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds, peak RSS (GiB, from wait4), peak GPU memory (GiB) and output of one child."""
    with GpuMemory() as g:
        r = run_child(cmd, env, "gpu", output=True)
    return {"seconds": r["seconds"], "peak_rss_gib": r["peak_rss_gb"], "gpu_gib": g.used_gib,
            "output": r["output"]}


def stage_score(a, work: Path, doc: dict, save) -> dict:
    from scale import generate, layer_forward_seconds

    import torch

    model = a.model or generate(a.shape)
    n_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    doc.clear()
    doc.update({"model": str(a.model) if a.model else f"generated {a.shape}-shaped Llama "
                "(bench/scale.py)", "calib_tokens": a.calib_tokens,
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None})
    lims = {}
    for role, dev in zip(("cuda", "cpu"), a.devices):
        out = work / f"scores-{a.shape}-{role}.json"
        r = timed([*CLI, "score", str(model), "-o", str(out), "--rescore", "--force",
                   "--calib-tokens", str(a.calib_tokens), "--device", dev],
                  {"LWQ_SCORES_CACHE": str(work / f"cache-{role}")})
        sc = json.loads(out.read_text())
        sens = sc.get("sensitivity", {}).get("seconds")
        fwd = layer_forward_seconds(model, a.calib_tokens, dev) * n_layers
        lims[role] = sc["lim"]
        r.pop("output")
        doc[role] = {**r, "sensitivity_seconds": sens,
                    "tokens_per_s": round(a.calib_tokens / r["seconds"], 2),
                    "without_sensitivity_tokens_per_s":
                        round(a.calib_tokens / (r["seconds"] - sens), 2) if sens else None,
                    "plain_forward_tokens_per_s": round(a.calib_tokens / fwd, 1)}
        print(f"gpu: scored on {dev}: {json.dumps(doc[role])}", flush=True)
        save()
    doc["lim_max_abs_diff_cuda_cpu"] = max(abs(x - y) for x, y in zip(lims["cuda"], lims["cpu"]))
    doc["speedup"] = round(doc["cpu"]["seconds"] / doc["cuda"]["seconds"], 2)
    return doc


def stage_eval(a, work: Path) -> dict:
    model = ROOT / "models" / "smollm2-135m-k256"
    gpu, cpu = a.devices
    out = work / "compare"
    shutil.rmtree(out, ignore_errors=True)
    run = timed([*CLI, "compare", str(model), "--avg-bits", *a.avg_bits, "--baselines", a.baselines,
                 "--text", str(a.text), "--chunks", str(a.chunks), "--calib-tokens",
                 str(a.calib_tokens), "--device", gpu, "-o", str(out)],
                {"LWQ_SCORES_CACHE": str(work / "cache-compare")})
    run.pop("output")
    print(f"gpu: compare on {gpu}: {run['seconds']} s", flush=True)
    doc = json.loads((out / "compare.json").read_text())
    base = out / doc["rows"][0]["file"]
    rows = []
    for r in doc["rows"][1:]:
        e = timed([*CLI, "eval", str(out / r["file"]), "--base", str(base), "--text", str(a.text),
                   "--chunks", str(a.chunks), "--device", cpu, "--json"])
        c = json.loads(e.pop("output").strip().splitlines()[-1])
        rows.append({"label": r["label"], "bpw": round(r["bpw"], 3), "cpu_eval_seconds": e["seconds"],
                     **{f"{k}_{d}": round(x[k], 5) for k in ("ppl", "kld_mean", "same_top_pct")
                        for d, x in (("cuda", r), ("cpu", c))}})
        print(f"gpu: {r['label']} on {cpu}: {json.dumps(rows[-1])}", flush=True)
    e = timed([*CLI, "eval", str(out / doc["rows"][-1]["file"]), "--base", str(base), "--text",
               str(a.text), "--chunks", str(a.chunks), "--device", gpu, "--json"])
    e.pop("output")
    return {"model": "models/smollm2-135m-k256", "text": str(a.text), "chunks": a.chunks,
            "compare_on_gpu": run, "rows": rows,
            "eval_one_file": {"file": doc["rows"][-1]["label"], "cuda": e,
                              "cpu_seconds": rows[-1]["cpu_eval_seconds"]}}


def stage_check(a, work: Path, doc: dict, save) -> None:
    """The GPU check in one device call (bench/gpu_check.sh builds llama.cpp first): CUDA
    `score` of the 1B shape, a mixed file converted from those scores, its perplexity on CUDA
    against llama.cpp's CPU backend (CUDA_VISIBLE_DEVICES empty: no GPU at all), and the file in
    `llama-completion` with every layer offloaded. Each step is saved as it ends; a step that
    would start after ``--deadline`` (epoch seconds) is skipped and says so."""
    import os

    import torch

    from scale import generate

    from lwq_gguf.llamacpp import find_llama_cpp

    doc.update({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "setup_seconds": float(os.environ.get("LWQ_GPU_SETUP_S", "nan")),
                "cuda_build_seconds": float(os.environ.get("LWQ_GPU_BUILD_S", "nan")),
                "steps": {}})
    steps = doc["steps"]
    cache = {"LWQ_SCORES_CACHE": str(work / "cache")}
    mixed = work / f"{a.shape}-mixed.gguf"

    def step(name: str, fn) -> bool:
        if a.deadline and time.time() > a.deadline:
            steps[name] = {"skipped": "past the deadline (--deadline)"}
        else:
            try:
                steps[name] = fn()
            except (SystemExit, Exception) as e:  # (a child failed: run_child's message)
                steps[name] = {"failed": f"{type(e).__name__}: {str(e)[-3000:]}"}
        print(f"gpu: check {name}: {json.dumps(steps[name])[:400]}", flush=True)
        save()
        return "seconds" in steps[name]

    def score():
        t0 = time.time()
        model = a.model or generate(a.shape)
        gen = round(time.time() - t0, 1)
        out = work / "scores.json"
        r = timed([*CLI, "score", str(model), "-o", str(out), "--rescore", "--force",
                   "--calib-tokens", str(a.calib_tokens), "--device", a.devices[0]], cache)
        r.pop("output")
        sens = json.loads(out.read_text())["sensitivity"]
        return {**r, "generate_seconds": gen, "calib_tokens": a.calib_tokens,
                "matmuls": sens.get("precision"), "phases": sens.get("phases")}

    def convert():
        r = timed([*CLI, "convert", str(a.model or generate(a.shape)), "--avg-bits",
                   a.avg_bits[0], "--scores", str(work / "scores.json"), "--device",
                   a.devices[0], "-o", str(mixed), "--force"], cache)
        r.pop("output")
        return {**r, "avg_bits": float(a.avg_bits[0]), "bytes": mixed.stat().st_size}

    def evaluate():
        got = {}
        for dev, env in ((a.devices[0], {}), ("cpu", {"CUDA_VISIBLE_DEVICES": ""})):
            r = timed([*CLI, "eval", str(mixed), "--text", str(a.text), "--chunks",
                       str(a.chunks), "--device", dev, "--json"], env)
            got["cpu" if env else "gpu"] = {
                "ppl": json.loads(r.pop("output").strip().splitlines()[-1])["ppl"], **r}
        x, y = (v["ppl"] for v in got.values())
        diff = abs(x / y - 1)
        return {**got, "seconds": sum(v["seconds"] for v in got.values()), "chunks": a.chunks,
                "ppl_rel_diff": round(diff, 6), "within_0.5pct": diff <= 0.005}

    def cli():
        tool = find_llama_cpp().tool("llama-completion")
        r = timed([tool, "-m", mixed, "-ngl", "99", "-no-cnv", "-n", "32", "--seed", "1", "--perf", "-v",
                   "-p", "The capital of France is"])
        log = r.pop("output")
        off = [ln.strip() for ln in log.splitlines() if "offloaded" in ln]
        speed = [ln.strip() for ln in log.splitlines() if "eval time" in ln]
        return {**r, "offloaded": off[-1] if off else None, "timings": speed[-2:],
                "all_layers_offloaded": bool(off) and _all_offloaded(off[-1])}

    if step("score", score) and step("convert", convert):
        step("eval", evaluate)
        step("cli", cli)


def _all_offloaded(line: str) -> bool:
    """'offloaded 17/17 layers to GPU' -> True."""
    import re

    m = re.search(r"offloaded (\d+)/(\d+) layers", line)
    return bool(m) and m.group(1) == m.group(2)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("stage", choices=["score", "eval", "check"])
    ap.add_argument("--shape", default="1b", choices=["1b", "8b"])
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--text", type=Path, default=WIKI)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--avg-bits", nargs="+", default=["3.5", "4.0"])
    ap.add_argument("--baselines", default="Q3_K_M,Q4_K_M")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "gpu")
    ap.add_argument("--model", type=Path, help="score, check: this HF folder instead of a "
                    "generated one")
    ap.add_argument("--devices", default="cuda,cpu", help="the GPU and the reference device "
                    "(cpu,cpu: a smoke test of this script on a machine without a GPU)")
    ap.add_argument("--deadline", type=float, help="check: skip the steps that would start "
                    "after this time (epoch seconds)")
    ap.add_argument("--results", type=Path, help="results file (default "
                    "bench/results/gpu-STAGE.json)")
    a = ap.parse_args()
    a.devices = a.devices.split(",")
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    res = a.results or RESULTS / f"gpu-{a.stage}.json"
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    title = f"GPU: {a.stage}"
    if a.stage == "check":
        d = doc["check"] = {}
        stage_check(a, work, d, lambda: write_results(res, doc, title, "(the check had not ended)"))
        st = d["steps"]
        head = ("step", "seconds", "result")
        cells = [("setup (wheels)", d["setup_seconds"], ""),
                 ("CUDA build of the pin", d["cuda_build_seconds"], "")]
        for name, r in st.items():
            what = ("skipped" if "skipped" in r else "FAILED" if "failed" in r else
                    {"score": f"peak GPU {r.get('gpu_gib')} GiB, RSS {r.get('peak_rss_gib')} GiB",
                     "convert": f"{r.get('bytes', 0) / 2**30:.2f} GiB file",
                     "eval": f"PPL {a.devices[0]} {r.get('gpu', {}).get('ppl')} vs cpu "
                             f"{r.get('cpu', {}).get('ppl')}: {r.get('ppl_rel_diff')}",
                     "cli": f"{r.get('offloaded')}"}.get(name, ""))
            cells.append((name, r.get("seconds", "-"), what))
        ok = (st.get("eval", {}).get("within_0.5pct") and st.get("cli", {}).get("all_layers_offloaded"))
        summary = f"GPU {d['gpu']}; CUDA PPL within 0.5 % of CPU and all layers offloaded: {bool(ok)}"
    elif a.stage == "score":
        d = doc["score"] = {}
        stage_score(a, work, d, lambda: write_results(res, doc, title, "(the stage had not ended)"))
        head = ("device", "seconds", "tokens/s", "w/o sensitivity tok/s", "plain fwd tok/s",
                "peak RSS GiB", "GPU GiB")
        cells = [(k, d[k]["seconds"], d[k]["tokens_per_s"], d[k]["without_sensitivity_tokens_per_s"],
                  d[k]["plain_forward_tokens_per_s"], d[k]["peak_rss_gib"], d[k]["gpu_gib"])
                 for k in ("cuda", "cpu")]
        summary = (f"CPU/CUDA time {d['speedup']}x; LIM max |cuda - cpu| "
                   f"{d['lim_max_abs_diff_cuda_cpu']:.2e}")
    else:
        d = doc["eval"] = stage_eval(a, work)
        head = ("file", "BPW", "PPL cuda", "PPL cpu", "KLD cuda", "KLD cpu", "same top % cuda",
                "cpu")
        cells = [(r["label"], r["bpw"], r["ppl_cuda"], r["ppl_cpu"], r["kld_mean_cuda"],
                  r["kld_mean_cpu"], r["same_top_pct_cuda"], r["same_top_pct_cpu"])
                 for r in d["rows"]]
        e = d["eval_one_file"]
        summary = (f"compare on the GPU {d['compare_on_gpu']['seconds']} s; eval of {e['file']} + "
                   f"base, {a.chunks} chunks: cuda {e['cuda']['seconds']} s, cpu "
                   f"{e['cpu_seconds']} s")
    print(table(head, cells))
    print(summary)
    write_results(res, doc, title, f"{markdown_table(head, cells)}\n\n{summary}")

if __name__ == "__main__":
    main()
