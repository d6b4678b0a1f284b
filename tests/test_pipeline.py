"""convert end to end on tiny generated models, with the real pinned llama.cpp."""

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf import GGUFReader

from conftest import run_cli
from lwq_gguf.model.inventory import write_16bit
from lwq_gguf.llamacpp import find_llama_cpp, run_tool
from lwq_gguf.plan.plan import Plan
from lwq_gguf.quant.types import K_LADDER
from lwq_gguf.quant.gguf_file import read_back


def tensor_bytes(path):
    return {t.name: bytes(t.data.tobytes()) for t in GGUFReader(str(path)).tensors}


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_output_file(out, target):
    info = read_back(out)
    plan = Plan.from_json(info.metadata["lwq.plan"])
    assert info.types == dict(zip((t.name for t in plan.tensors), plan.types))
    assert abs(info.bpw - target) <= 0.02
    assert info.metadata["lwq.version"]
    return info, plan


@pytest.fixture(scope="module")
def llama2(tiny):
    return tiny("llama", 2)


@pytest.fixture(scope="module")
def llama2_scores(llama2, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "s.json"
    p = run_cli("-q", "score", llama2, "-o", out, "--calib-tokens", "1024", "--ladder", "k",
                check=True)  # (K-quants: fewer types, a shorter test)
    assert out.with_suffix(".png").stat().st_size > 1000 and "LIM rank" in p.stdout
    assert "; quantizers rebuilt" in p.stdout  # (lwq_gguf.quant.rebuilt, tests/quant)
    assert json.loads(out.read_text())["sensitivity"]["ladder"] == list(K_LADDER)  # as asked
    return out


def test_console_script_and_module_entry_points():
    script = Path(sys.executable).parent / "lwq-gguf"
    for cmd in ([str(script), "--help"], [sys.executable, "-m", "lwq_gguf", "convert", "--help"]):
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode == 0 and "convert" in p.stdout, p.stderr


@pytest.mark.parametrize("arch,layers,kw", [
    ("llama", 3, dict(dtype="float32")),
    ("qwen2", 2, dict(shards=2)),
    ("qwen3", 4, dict(dtype="bfloat16", shards=2, tied=True)),
    ("mistral", 2, {}),
])
@pytest.mark.slow
def test_architectures_convert_and_load_in_llama_cpp(tiny, tmp_path, arch, layers, kw):
    model = tiny(arch, layers, **kw)
    out = tmp_path / f"{arch}.gguf"
    p = run_cli("-q", "convert", model, "--avg-bits", "4.0", "-o", out, "--calib-tokens", "512",
                "--ladder", "k", check=True)
    info, plan = check_output_file(out, 4.0)
    m = re.search(r"llama.cpp check PPL ([0-9.]+)", p.stdout)
    assert m and math.isfinite(float(m.group(1))), p.stdout
    scores = json.loads(info.metadata["lwq.scores"])
    assert len(scores["lim"]) == layers and scores["calib_tokens"] == 512
    assert plan.config.strategy == "auto" and info.metadata["quantize.imatrix.file"] == "imatrix.gguf"
    assert "BPW" in p.stdout and "type" in p.stdout  # the summary table


@pytest.mark.parametrize("target", [3.5, 5.5])
def test_more_targets_with_reused_scores(llama2, llama2_scores, tmp_path, target):
    out = tmp_path / "t.gguf"
    run_cli("-q", "convert", llama2, "--avg-bits", target, "--scores", llama2_scores, "-o", out,
            "--no-verify", "--ladder", "k", check=True)
    check_output_file(out, target)


@pytest.mark.slow
def test_two_runs_are_byte_identical_and_plan_file_reproduces(llama2, tmp_path):
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    run_cli("-q", "convert", llama2, "--avg-bits", "3.6", "-o", a, "--no-verify", "--calib-tokens", "1024",
            "--ladder", "k", check=True)
    run_cli("-q", "convert", llama2, "--avg-bits", "3.6", "-o", b, "--no-verify", "--calib-tokens", "1024",
            "--ladder", "k", check=True)
    assert sha(a) == sha(b)
    # the same plan, saved and re-used, gives the same tensors
    plan = tmp_path / "p.json"
    run_cli("-q", "plan", llama2, "--avg-bits", "3.6", "-o", plan, "--calib-tokens", "1024",
            "--ladder", "k", check=True)
    run_cli("-q", "convert", llama2, "--plan", plan, "-o", c, "--no-verify", "--calib-tokens", "1024",
            "--ladder", "k", check=True)
    assert tensor_bytes(c) == tensor_bytes(a)


@pytest.mark.slow
def test_tensor_type_file_drives_plain_llama_quantize_and_imatrix_is_honoured(
        llama2, llama2_scores, tmp_path):
    lc = find_llama_cpp()
    ours, types = tmp_path / "ours.gguf", tmp_path / "types.txt"
    run_cli("-q", "plan", llama2, "--avg-bits", "4.1", "--scores", llama2_scores,
            "--imatrix", "none", "--tensor-type-file", types, "--encoder", "ggml", "--ladder", "k",
            check=True)
    run_cli("-q", "convert", llama2, "--avg-bits", "4.1", "--scores", llama2_scores, "-o", ours,
            "--imatrix", "none", "--no-verify", "--encoder", "ggml", "--ladder", "k", check=True)
    base, plain = tmp_path / "base.gguf", tmp_path / "plain.gguf"
    write_16bit(lc, llama2, base, "auto")
    run_tool([str(lc.tool("llama-quantize")), "--tensor-type-file", str(types), str(base),
              str(plain), "q8_0"], what="llama-quantize")
    assert tensor_bytes(plain) == tensor_bytes(ours)

    calib = tmp_path / "calib.txt"
    calib.write_text((lc.src / "README.md").read_text() * 3)
    imat = tmp_path / "imatrix.gguf"
    run_tool([str(lc.tool("llama-imatrix")), "-m", str(base), "-f", str(calib), "-c", "128",
              "--chunks", "4", "-o", str(imat)], what="llama-imatrix")
    with_im = tmp_path / "im.gguf"
    run_cli("-q", "convert", llama2, "--avg-bits", "4.1", "--scores", llama2_scores, "-o", with_im,
            "--imatrix", imat, "--encoder", "ggml", "--ladder", "k", check=True)
    a, b = tensor_bytes(with_im), tensor_bytes(ours)
    assert a.keys() == b.keys()
    assert a["blk.0.ffn_up.weight"] != b["blk.0.ffn_up.weight"]  # the imatrix changed the quants


@pytest.mark.slow
def test_force_replaces_and_sigkill_leaves_nothing_at_target(llama2, llama2_scores, tmp_path):
    """Killed while the two-step path writes the 16-bit GGUF and while llama-quantize runs (the
    single pass: tests/write/test_onepass.py)."""
    out = tmp_path / "k.gguf"
    work = tmp_path / ".k.gguf.lwq-work"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for marker in (work / "base.gguf", tmp_path / ".k.gguf.partial"):
        proc = subprocess.Popen([sys.executable, "-m", "lwq_gguf", "-q", "convert", str(llama2),
                                 "--avg-bits", "4", "-o", str(out), "--calib-tokens", "1024",
                                 "--two-step", "--encoder", "ggml", "--ladder", "k"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not out.exists()
    run_cli("-q", "convert", llama2, "--avg-bits", "4", "-o", out, "--no-verify",
            "--calib-tokens", "1024", "--ladder", "k", check=True)  # (llama2_scores', cached)
    assert out.exists() and not work.exists() and not (tmp_path / ".k.gguf.partial").exists()
    first = sha(out)
    run_cli("-q", "convert", llama2, "--avg-bits", "5", "-o", out, "--no-verify", "--force",
            "--calib-tokens", "1024", "--ladder", "k", check=True)
    assert sha(out) != first
    check_output_file(out, 5.0)


def test_a_listing_for_scoring_measures_no_header_and_a_plan_adds_it(tiny, tmp_path, monkeypatch):
    """`score` lists the tensors without the 16-bit file's header (which needs the vocabulary
    read); the first plan measures it, and the cache then holds both."""
    import json

    from lwq_gguf.model.inventory import inventory, model_tensors
    from lwq_gguf.model.load import open_model

    monkeypatch.setenv("LWQ_SCORES_CACHE", str(tmp_path))
    model = open_model(tiny("llama", 2, tied=True))
    tensors = model_tensors(model)
    (entry,) = (tmp_path / "inventory").glob("*.json")
    assert json.loads(entry.read_text())["header_bytes"] is None
    inv = inventory(model)
    assert inv.tensors == tensors and inv.header_bytes > 1000
    assert json.loads(entry.read_text())["header_bytes"] == inv.header_bytes
    assert model_tensors(model, header=True) == tensors  # (from the cache, header and all)
