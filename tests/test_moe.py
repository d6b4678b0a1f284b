"""Mixture-of-experts models end to end on tiny generated ones (Mixtral, Qwen2-MoE with shared
experts, Qwen3-MoE, OLMoE): converted, loaded and evaluated; merged experts, the F32 router, the
per-expert imatrix as llama-imatrix makes it, split budgets, bad MoE input."""

import json

import numpy as np
import pytest
from gguf import GGUFReader

from conftest import error_line, run_cli
from lwq_gguf.llamacpp import find_llama_cpp, run_tool
from lwq_gguf.score.scores import default_calibration
from lwq_gguf.model.inventory import write_16bit
from test_architectures import MOE, converts_loads_and_evaluates


@pytest.mark.slow
@pytest.mark.parametrize("arch", MOE)
def test_every_moe_architecture_converts_loads_and_evaluates(tiny, arch, tmp_path):
    converts_loads_and_evaluates(tiny, arch, tmp_path)


def quantized_bytes(path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data).view(np.uint8).reshape(-1)
            for t in GGUFReader(str(path)).tensors}


@pytest.mark.slow
def test_moe_imatrix_is_llama_imatrix_per_expert(tiny, tmp_path):
    """The imatrix lwq-gguf collects through the model's routing equals llama-imatrix's on the same
    tokens: the same tokens per expert, the same sums, and llama-quantize --imatrix makes the same
    tensors from either (but for rare blocks: llama.cpp runs the activations in F16). In fp32:
    bf16 routing flips more near-ties (6 of 2,048 routed tokens on this tiny random router, which
    moves its Fisher by ~5 %)."""
    from lwq_gguf.quant.imatrix import Imatrix, read_imatrix, write_imatrix

    path = tiny("mixtral", 2)
    lc = find_llama_cpp()
    run_cli("-q", "score", path, "--calib-tokens", "1024", "--score-precision", "fp32", "-o",
            tmp_path / "s.json", check=True)
    ours = read_imatrix(tmp_path / "s.imatrix.gguf")
    base, ref_file = tmp_path / "base.gguf", tmp_path / "ref.imatrix.gguf"
    write_16bit(lc, path, base, "f16")
    run_tool([str(lc.tool("llama-imatrix")), "-m", str(base), "-f", str(default_calibration()),
              "-c", "512", "--chunks", "2", "-o", str(ref_file)], what="llama-imatrix")
    ref = read_imatrix(ref_file)
    assert set(ref.sums) <= set(ours.sums) and "blk.1.ffn_down_exps.weight" in ref.sums
    for name, sums in ref.sums.items():
        c, rc = ours.counts[name], ref.counts[name]
        assert len(c) == len(rc) and c.sum() == rc.sum(), name
        assert np.abs(c - rc).sum() <= 0.002 * rc.sum(), (name, c, rc)  # near-ties may flip
        np.testing.assert_allclose(ours.sums[name], sums, rtol=0.02, atol=1e-3 * sums.max(),
                                   err_msg=name)

    def quantize(imatrix_file):
        out = tmp_path / f"{imatrix_file.stem}.q3km.gguf"
        run_tool([str(lc.tool("llama-quantize")), "--imatrix", str(imatrix_file), str(base),
                  str(out), "Q3_K_M"], what="llama-quantize")
        return quantized_bytes(out)

    a, b = quantize(tmp_path / "s.imatrix.gguf"), quantize(ref_file)
    differs = {n: float((a[n] != b[n]).mean()) for n in b if n != "output.weight"}  # (ours
    # also weighs the output, which llama-imatrix leaves out)
    assert max(differs.values()) < 0.01, differs
    # control: the same sums with the experts' rows in the wrong order change the expert tensors
    rolled = Imatrix({n: np.roll(s.reshape(len(ours.counts[n]), -1), 1, axis=0).reshape(-1)
                      for n, s in ours.sums.items()},
                     {n: np.roll(c, 1) for n, c in ours.counts.items()}, ours.dataset,
                     ours.chunk_size, ours.chunks)
    write_imatrix(rolled, tmp_path / "rolled.gguf")
    c = quantize(tmp_path / "rolled.gguf")
    wrong = float((c["blk.1.ffn_down_exps.weight"] != b["blk.1.ffn_down_exps.weight"]).mean())
    assert wrong > 5 * max(differs["blk.1.ffn_down_exps.weight"], 0.002), wrong


def rewrite(folder, drop=(), config=None):
    """The model folder with tensors dropped from its shard and/or config.json keys changed."""
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    tensors = {k: v for k, v in load_file(f).items() if k not in drop}
    save_file(tensors, f, metadata={"format": "pt"})
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **config}))


@pytest.mark.parametrize("case", ["expert_count", "missing_expert", "unknown_arch"])
def test_bad_moe_and_architecture_input(tiny, tmp_path, case):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny("mixtral", 2), model)
    if case == "expert_count":
        rewrite(model, config={"num_local_experts": 3})
        want = "num_local_experts is 3 but model.safetensors holds expert 3 of layer 0"
    elif case == "missing_expert":
        rewrite(model, drop={"model.layers.1.block_sparse_moe.experts.2.w3.weight"})
        want = "layer 1 expert 2 has no w3.weight"
    else:
        rewrite(model, config={"architectures": ["NoSuchModelForCausalLM"]})
        want = "'NoSuchModelForCausalLM' is not supported by llama.cpp's converter"
    out = tmp_path / "o.gguf"
    p = run_cli("convert", model, "--avg-bits", "4", "-o", out)
    assert want in error_line(p), p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m"]  # nothing written


@pytest.mark.slow
def test_dense_size_end_to_end(tiny, tmp_path):
    """--dense-size on a real (tiny) MoE: the non-expert part lands within its limit, the file
    within 0.02 BPW of --avg-bits, and the summary prints both parts."""
    from lwq_gguf.plan.plan import Plan
    from lwq_gguf.quant.tensors import tensor_nbytes

    path = tiny("mixtral", 2)
    free = tmp_path / "free.json"
    run_cli("-q", "plan", path, "--avg-bits", "3", "-o", free, "--calib-tokens", "512",
            "--ladder", "k", check=True)
    p0 = Plan.from_json(free.read_text())
    experts_max = sum(tensor_nbytes("q8_0", t.shape) for t in p0.tensors if "_exps." in t.name)
    room = experts_max - (p0.nbytes - p0.dense_nbytes)
    limit = p0.dense_nbytes - room // 2  # binding: the experts must take what the rest gives up
    out = tmp_path / "split.gguf"
    p = run_cli("convert", path, "--avg-bits", "3", "--dense-size", str(limit), "-o", out,
                "--ladder", "k", "--calib-tokens", "512", "--no-verify", check=True)
    assert f"(limit {limit / 2**20:.1f} MiB)" in p.stdout and "routed experts" in p.stdout
    plan = Plan.from_json(GGUFReader(str(out)).get_field("lwq.plan").contents())
    assert plan.dense_nbytes <= limit < p0.dense_nbytes
    assert abs(plan.bpw() - 3) <= 0.02
    assert plan.nbytes - plan.dense_nbytes > p0.nbytes - p0.dense_nbytes
