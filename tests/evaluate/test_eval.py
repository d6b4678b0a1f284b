"""`lwq-gguf eval` against llama-perplexity itself, on the real aligned demo model."""

import json
import re

import pytest

from conftest import ROOT, error_line, run_cli
from lwq_gguf.model.inventory import write_16bit
from lwq_gguf.llamacpp import find_llama_cpp, run_tool
from lwq_gguf.score.scores import default_calibration

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
CHUNKS = 2


@pytest.fixture(scope="module")
def files(demo_models, tmp_path_factory):
    """(16-bit base, llama.cpp Q3_K_M, text) of the aligned demo model."""
    lc = find_llama_cpp()
    d = tmp_path_factory.mktemp("eval")
    base, quant = d / "base.gguf", d / "q3km.gguf"
    write_16bit(lc, demo_models[1], base, "f16")
    run_tool([str(lc.tool("llama-quantize")), str(base), str(quant), "Q3_K_M"], what="llama-quantize")
    return base, quant, WIKI if WIKI.is_file() else default_calibration()


def perplexity_cli(*args, until: str):
    """llama-perplexity with one chunk per batch (-b 512), as `eval` runs: its default -b 2048
    evaluates 4 chunks per batch, which changes the CPU kernels' rounding (Q3_K_M on this model:
    PPL 33.28 vs 33.07 on 3 chunks). Run again while its output lacks ``until``: at the pinned
    build it logs from a thread it does not join at exit, and a run now and then loses its last
    lines (lwq_gguf/write/verify.py)."""
    lc = find_llama_cpp()
    for _ in range(5):
        out = run_tool([str(lc.tool("llama-perplexity")), "-c", "512", "-b", "512", "--chunks",
                        str(CHUNKS), "-ngl", "0", *map(str, args)], what="llama-perplexity")
        if re.search(until, out):
            return out
    raise AssertionError(f"llama-perplexity printed no {until!r} in 5 runs:\n{out[-2000:]}")


@pytest.mark.slow
def test_ppl_and_kld_match_llama_perplexity(files, tmp_path):
    base, quant, text = files
    p = run_cli("eval", quant, "--base", base, "--text", text, "--chunks", CHUNKS, "--json",
                check=True)
    ours = json.loads(p.stdout)
    assert set(ours) >= {"ppl", "ppl_err", "kld_mean", "kld_err", "kld_p99", "same_top_pct",
                         "ppl_ratio", "chunks", "tokens_scored"}
    assert ours["chunks"] == CHUNKS and ours["tokens_scored"] == CHUNKS * 255

    final = r"Final estimate: PPL = ([0-9.]+)"
    ppl = float(re.search(final, perplexity_cli("-m", quant, "-f", text, until=final)).group(1))
    assert abs(ours["ppl"] / ppl - 1) < 1e-3, (ours["ppl"], ppl)

    kld_base = tmp_path / "base.kld"
    perplexity_cli("-m", base, "-f", text, "--kl-divergence-base", kld_base, until="")  # (the file)
    out = perplexity_cli("-m", quant, "--kl-divergence-base", kld_base, "--kl-divergence",
                         until=r"Same top p:")
    kld = float(re.search(r"Mean    KLD:\s+([0-9.]+)", out).group(1))
    same = float(re.search(r"Same top p:\s+([0-9.]+)", out).group(1))
    assert ours["kld_mean"] > 0.01  # Q3_K_M is measurably off the 16-bit model
    assert abs(ours["kld_mean"] / kld - 1) < 0.01, (ours["kld_mean"], kld)
    assert abs(ours["same_top_pct"] - same) < 1.0


def test_eval_bad_input(files, tiny, tmp_path):
    base, quant, text = files
    short = tmp_path / "short.txt"
    short.write_text(default_calibration().read_text()[:2000])
    assert "too short" in error_line(run_cli("eval", quant, "--text", short))

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(quant.read_bytes()[: quant.stat().st_size // 2])
    assert "broken.gguf" in error_line(run_cli("eval", broken, "--text", text, "--chunks", "2"))
    assert "not a GGUF file" in error_line(run_cli("eval", text, "--text", text))
    other = tmp_path / "qwen3.gguf"
    write_16bit(find_llama_cpp(), tiny("qwen3", 2), other, "f16")
    line = error_line(run_cli("eval", quant, "--base", other, "--text", text, "--chunks", "2"))
    assert "architecture" in line and "same model" in line

    if not find_llama_cpp().has_cuda:
        line = error_line(run_cli("eval", quant, "--text", text, "--device", "cuda"))
        assert "no CUDA backend" in line and "LWQ_CUDA=1 make setup" in line


@pytest.mark.slow
def test_torch_free_child_gives_the_same_numbers(files, tiny, tmp_path):
    """With a CUDA build llama.cpp runs in a child that never imports torch (the two CUDA stacks
    crash in one process); LWQ_EVAL_ISOLATE=1 takes that path with this CPU build."""
    import os
    import subprocess
    import sys

    probe = "import sys, lwq_gguf.evaluate.perplexity, lwq_gguf.evaluate.child; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", probe], check=True)
    base, quant, text = files
    # in this process, where torch is loaded: torch's arithmetic (as `compare` after scoring);
    # `eval` itself (numpy, torch not loaded) is held to llama-perplexity above
    import torch  # noqa: F401

    from lwq_gguf.evaluate.perplexity import EvalConfig, evaluate

    inproc = evaluate(quant, text, find_llama_cpp(), EvalConfig(chunks=CHUNKS), base=base,
                      progress=False).to_dict()
    args = ("eval", quant, "--base", base, "--text", text, "--chunks", CHUNKS, "--json")
    env = dict(os.environ, LWQ_EVAL_ISOLATE="1")
    child = json.loads(run_cli(*args, check=True, env=env).stdout)
    assert child["tokens_scored"] == inproc["tokens_scored"]
    for k in ("ppl", "ppl_ratio", "kld_mean", "kld_p99"):
        assert abs(child[k] / inproc[k] - 1) < 1e-4, (k, child[k], inproc[k])
    assert abs(child["same_top_pct"] - inproc["same_top_pct"]) < 0.2
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(quant.read_bytes()[: quant.stat().st_size // 2])
    line = error_line(run_cli("eval", broken, "--text", text, "--chunks", "2", env=env))
    assert "broken.gguf" in line
    short = tmp_path / "short.txt"
    short.write_text(default_calibration().read_text()[:2000])
    assert "too short" in error_line(run_cli("compare", tiny("llama", 2), "--baselines", "Q8_0",
                                             "--text", short, "-o", tmp_path / "cmp", env=env))
