"""The single-pass writer against the two-step path (converter -> 16-bit GGUF -> llama-quantize)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.numpy import load_file, save_file

from conftest import error_line, run_cli
from lwq_gguf.write.onepass import loader_order


@pytest.mark.parametrize("arch,layers,kw,extra", [
    ("llama", 2, {}, ["--tensor-type", "attn_v=f16", "--tensor-type", "ffn_down=q8_0"]),
    ("llama", 2, {}, ["--imatrix", "none", "--outtype", "f32", "--avg-bits", "5"]),
    ("qwen3", 4, dict(dtype="bfloat16", shards=2, tied=True), ["--imatrix", "none"]),
])
@pytest.mark.slow
def test_single_pass_is_byte_identical_to_two_step(tiny, tmp_path, arch, layers, kw, extra):
    """Same bytes as llama-quantize's file: header, metadata order, tensor order, blocks."""
    model = tiny(arch, layers, **kw)
    one, two = tmp_path / "one.gguf", tmp_path / "two.gguf"
    args = ["-q", "convert", model, "--avg-bits", "4.2", "--calib-tokens", "512", "--no-verify",
            "--encoder", "ggml", *extra]  # a later --avg-bits wins
    run_cli(*args, "-o", two, "--two-step", check=True)
    p = run_cli(*args, "-o", one, check=True)
    assert one.read_bytes() == two.read_bytes()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["one.gguf", "two.gguf"], p.stdout


def test_tensor_order_is_llama_quantize_order():
    names = ["token_embd.weight", "blk.10.attn_q.weight", "output.weight", "blk.2.ffn_up.weight",
             "blk.2.attn_k.weight", "output_norm.weight"]
    assert sorted(names, key=loader_order) == [
        "output.weight", "output_norm.weight", "token_embd.weight", "blk.2.attn_k.weight",
        "blk.2.ffn_up.weight", "blk.10.attn_q.weight"]


def test_nan_found_while_writing_a_planned_model(tiny, tmp_path):
    """With --plan nothing else reads the weights: the writer's own check names the tensor."""
    src = tiny("llama", 2)
    model = tmp_path / "model"
    model.mkdir()
    for f in src.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    plan = tmp_path / "plan.json"
    run_cli("-q", "plan", model, "--avg-bits", "4", "--strategy", "lim", "--imatrix", "none",
            "--calib-tokens", "512", "-o", plan, check=True)
    f = next(f for f in model.glob("*.safetensors"))
    tensors = load_file(f)
    name = next(n for n in tensors if n.endswith("layers.1.mlp.down_proj.weight"))
    tensors[name] = tensors[name].copy()
    tensors[name][3, 5] = float("inf")
    save_file(tensors, f, metadata={"format": "pt"})
    out = tmp_path / "out.gguf"
    line = error_line(run_cli("-q", "convert", model, "--plan", plan, "--imatrix", "none",
                              "-o", out))
    assert "'blk.1.ffn_down.weight' has 1 NaN/Inf values" in line
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))


@pytest.mark.slow
def test_sigkill_while_writing_leaves_nothing_and_rerun_succeeds(tiny, tmp_path):
    model = tiny("llama", 2)
    out, partial = tmp_path / "k.gguf", tmp_path / ".k.gguf.partial"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "lwq_gguf", "-q", "convert", str(model), "--avg-bits", "4",
           "-o", str(out), "--calib-tokens", "512", "--ladder", "k"]
    subprocess.run(cmd + ["--no-verify", "-o", str(tmp_path / "warm.gguf")], check=True,
                   capture_output=True, env=env)  # scores cached: the next run goes to writing
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (partial.exists() and partial.stat().st_size > 0) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    run_cli(*cmd[3:], "--no-verify", check=True)
    assert out.exists() and not partial.exists()
