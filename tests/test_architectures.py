"""Every architecture of the table (lwq_gguf/model/arch.py) end to end on a tiny generated model:
scored (the streamed passes equal the whole model's: tests/model/test_stream.py), planned,
converted to a mixed GGUF that llama.cpp loads, evaluated with KLD; the mixture-of-experts parts
(merged experts, the F32 router, shared experts, per-expert imatrix as llama-imatrix makes it);
bad MoE input."""

import json
import math

import numpy as np
import pytest
from gguf import GGUFReader

from conftest import error_line, run_cli
from lwq_gguf.llamacpp import find_llama_cpp, run_tool
from lwq_gguf.score.scores import default_calibration
from lwq_gguf.write.converter import write_16bit

ADDED = ("gemma2", "gemma3", "phi3", "mixtral", "qwen2moe", "qwen3moe", "olmoe")
MOE = ("mixtral", "qwen2moe", "qwen3moe", "olmoe")
FLOAT = ("F32", "F16", "BF16")


def gguf_types(path) -> dict[str, tuple[str, tuple]]:
    return {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape))
            for t in GGUFReader(str(path)).tensors}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ADDED)
def test_every_architecture_converts_loads_and_evaluates(tiny, arch, tmp_path):
    path = tiny(arch, 2, tied=arch == "gemma2")  # (a tied 49152-row embedding would dwarf
    # two tiny layers: no plan could land within 0.02 BPW of the target)
    out = tmp_path / "q.gguf"
    run_cli("-q", "convert", path, "--avg-bits", "4", "-o", out, "--calib-tokens", "512",
            "--no-verify", check=True)  # (eval runs it in llama.cpp below)
    reader = GGUFReader(str(out))
    bits = sum(int(t.n_bytes) * 8 for t in reader.tensors)
    bpw = bits / sum(int(t.n_elements) for t in reader.tensors)
    assert abs(bpw - 4) <= 0.02, bpw  # the 3-D expert tensors counted exactly
    types = gguf_types(out)
    quantized = {ty for ty, _ in types.values() if ty not in FLOAT}
    assert len(quantized) >= 2, types  # a mixed file
    if arch in MOE:
        exps = {n: v for n, v in types.items() if "_exps." in n}
        assert len(exps) == 6 and all(len(s) == 3 and s[2] == 4 for _, s in exps.values())
        assert all(ty not in FLOAT for ty, _ in exps.values())
        assert all(ty == "F32" for n, (ty, _) in types.items() if "ffn_gate_inp." in n)
    if arch == "qwen2moe":  # shared experts are tensors of their own, planned like the others
        assert all(types[f"blk.{i}.ffn_{k}_shexp.weight"][0] not in FLOAT
                   for i in range(2) for k in ("gate", "up", "down"))
    base = tmp_path / "base.gguf"
    write_16bit(find_llama_cpp(), path, base, "f16")
    e = run_cli("eval", out, "--base", base, "--text", default_calibration(), "--chunks", "2",
                "--ctx", "256", "--json", check=True)
    r = json.loads(e.stdout)
    assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    assert 0 < r["kld_mean"] < 5, r


def quantized_bytes(path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data).view(np.uint8).reshape(-1)
            for t in GGUFReader(str(path)).tensors}


@pytest.mark.slow
def test_moe_imatrix_is_llama_imatrix_per_expert(tiny, tmp_path):
    """The imatrix lwq-gguf collects through the model's routing equals llama-imatrix's on the same
    tokens: the same tokens per expert, the same sums, and llama-quantize --imatrix makes the same
    tensors from either (but for rare blocks: llama.cpp runs the activations in F16)."""
    from lwq_gguf.quant.imatrix import Imatrix, read_imatrix, write_imatrix

    path = tiny("mixtral", 2)
    lc = find_llama_cpp()
    run_cli("-q", "score", path, "--calib-tokens", "2048", "-o", tmp_path / "s.json", check=True)
    ours = read_imatrix(tmp_path / "s.imatrix.gguf")
    base, ref_file = tmp_path / "base.gguf", tmp_path / "ref.imatrix.gguf"
    write_16bit(lc, path, base, "f16")
    run_tool([str(lc.tool("llama-imatrix")), "-m", str(base), "-f", str(default_calibration()),
              "-c", "512", "--chunks", "4", "-o", str(ref_file)], what="llama-imatrix")
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
def test_unscored_architecture_gets_a_labelled_weight_error_plan(tiny, tmp_path):
    """An architecture the converter knows and lwq-gguf runs no forward pass of: the plan comes
    from weight error (weighted by a llama-imatrix file when given), and says so everywhere."""
    path = tiny("stablelm", 2)
    out = tmp_path / "q.gguf"
    p = run_cli("convert", path, "--avg-bits", "4.5", "-o", out, "--no-verify", check=True)
    assert "no forward pass" in p.stderr and "weight error" in p.stdout
    meta = GGUFReader(str(out)).get_field("lwq.plan").contents()
    assert json.loads(meta)["basis"].startswith("weight error")
    lim = run_cli("plan", path, "--avg-bits", "4.5", "--strategy", "lim")
    assert "needs a forward pass" in error_line(lim)

    lc = find_llama_cpp()
    base, imat = tmp_path / "base.gguf", tmp_path / "imatrix.gguf"
    write_16bit(lc, path, base, "f16")
    run_tool([str(lc.tool("llama-imatrix")), "-m", str(base), "-f", str(default_calibration()),
              "-c", "256", "--chunks", "2", "-o", str(imat)], what="llama-imatrix")
    weighted = tmp_path / "w.json"
    p = run_cli("plan", path, "--avg-bits", "3.5", "--imatrix", imat, "-o", weighted, check=True)
    plain = tmp_path / "p.json"
    run_cli("-q", "plan", path, "--avg-bits", "3.5", "--imatrix", "none", "-o", plain, check=True)
    a, b = (json.loads(f.read_text()) for f in (weighted, plain))
    assert a["basis"] == b["basis"] and a["basis"].startswith("weight error")
    assert [t["type"] for t in a["tensors"]] != [t["type"] for t in b["tensors"]]


def test_readme_lists_every_architecture_of_the_table():
    from conftest import ROOT
    from lwq_gguf.model.arch import ARCHS

    readme = (ROOT / "README.md").read_text()
    assert all(f"`{a.hf}`" in readme for a in ARCHS)


@pytest.mark.slow
def test_dense_size_end_to_end(tiny, tmp_path):
    """--dense-size on a real (tiny) MoE: the non-expert part lands within its limit, the file
    within 0.02 BPW of --avg-bits, and the summary prints both parts."""
    from lwq_gguf.plan.plan import Plan
    from lwq_gguf.quant.tensors import tensor_nbytes

    path = tiny("mixtral", 2)
    free = tmp_path / "free.json"
    run_cli("-q", "plan", path, "--avg-bits", "3", "-o", free, "--calib-tokens", "512",
            check=True)
    p0 = Plan.from_json(free.read_text())
    experts_max = sum(tensor_nbytes("q8_0", t.shape) for t in p0.tensors if "_exps." in t.name)
    room = experts_max - (p0.nbytes - p0.dense_nbytes)
    limit = p0.dense_nbytes - room // 2  # binding: the experts must take what the rest gives up
    out = tmp_path / "split.gguf"
    p = run_cli("convert", path, "--avg-bits", "3", "--dense-size", str(limit), "-o", out,
                "--calib-tokens", "512", "--no-verify", check=True)
    assert f"(limit {limit / 2**20:.1f} MiB)" in p.stdout and "routed experts" in p.stdout
    plan = Plan.from_json(GGUFReader(str(out)).get_field("lwq.plan").contents())
    assert plan.dense_nbytes <= limit < p0.dense_nbytes
    assert abs(plan.bpw() - 3) <= 0.02
    assert plan.nbytes - plan.dense_nbytes > p0.nbytes - p0.dense_nbytes
