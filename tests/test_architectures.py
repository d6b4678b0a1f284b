"""Every architecture of the table (lwq_gguf/model/arch.py) end to end on a tiny generated model:
scored (the streamed passes equal the whole model's: tests/model/test_stream.py), planned,
converted to a mixed GGUF that llama.cpp loads and runs (one also evaluated with KLD against
its 16-bit file); an architecture only the converter knows (a labelled weight-error
plan). Mixture-of-experts specifics: tests/test_moe.py."""

import json
import math
import re

import pytest
from gguf import GGUFReader

from conftest import error_line, run_cli
from lwq_gguf.llamacpp import find_llama_cpp, run_tool
from lwq_gguf.score.scores import default_calibration
from lwq_gguf.model.inventory import write_16bit

DENSE_ADDED = ("gemma2", "gemma3", "phi3")
MOE = ("mixtral", "qwen2moe", "qwen3moe", "olmoe")
FLOAT = ("F32", "F16", "BF16")


def gguf_types(path) -> dict[str, tuple[str, tuple]]:
    return {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape))
            for t in GGUFReader(str(path)).tensors}


EVALUATED = ("qwen2moe",)  # eval against the 16-bit file too (MoE with a shared expert); every
# file is run by convert's own check, which is `eval` without a base


@pytest.mark.slow
@pytest.mark.parametrize("arch", DENSE_ADDED)
def test_every_architecture_converts_loads_and_evaluates(tiny, arch, tmp_path):
    converts_loads_and_evaluates(tiny, arch, tmp_path)


def converts_loads_and_evaluates(tiny, arch, tmp_path):
    """(Also run on the MoE architectures by tests/test_moe.py.)"""
    path = tiny(arch, 2, tied=arch == "gemma2")
    out = tmp_path / "q.gguf"
    # (--ladder k: the i-quant grids cost ~20 s to set up per process; tests/quant and the demo
    # model's default run cover them)
    p = run_cli("-q", "convert", path, "--avg-bits", "4", "-o", out, "--calib-tokens", "256",
                "--ladder", "k", check=True)
    ppl = float(re.search(r"llama.cpp check PPL ([0-9.]+)", p.stdout).group(1))
    assert math.isfinite(ppl) and ppl > 1, p.stdout
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
    if arch not in EVALUATED:
        return
    base = tmp_path / "base.gguf"
    write_16bit(find_llama_cpp(), path, base, "f16")
    e = run_cli("eval", out, "--base", base, "--text", default_calibration(), "--chunks", "2",
                "--ctx", "256", "--json", check=True)
    r = json.loads(e.stdout)
    assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    assert 0 < r["kld_mean"] < 5, r


@pytest.mark.slow
def test_unscored_architecture_gets_a_labelled_weight_error_plan(tiny, tmp_path):
    """An architecture the converter knows and lwq-gguf runs no forward pass of: the plan comes
    from weight error (weighted by a llama-imatrix file when given), and says so everywhere."""
    path = tiny("stablelm", 2)
    out = tmp_path / "q.gguf"
    p = run_cli("convert", path, "--avg-bits", "3.5", "-o", out, "--no-verify", "--ladder", "k",
                check=True)
    assert "no forward pass" in p.stderr and "weight error" in p.stdout
    b = json.loads(GGUFReader(str(out)).get_field("lwq.plan").contents())
    assert b["basis"].startswith("weight error")
    lim = run_cli("plan", path, "--avg-bits", "3.5", "--strategy", "lim")
    assert "needs a forward pass" in error_line(lim)

    lc = find_llama_cpp()
    base, imat = tmp_path / "base.gguf", tmp_path / "imatrix.gguf"
    write_16bit(lc, path, base, "f16")
    run_tool([str(lc.tool("llama-imatrix")), "-m", str(base), "-f", str(default_calibration()),
              "-c", "256", "--chunks", "2", "-o", str(imat)], what="llama-imatrix")
    weighted = tmp_path / "w.json"
    run_cli("-q", "plan", path, "--avg-bits", "3.5", "--imatrix", imat, "-o", weighted,
            "--ladder", "k", check=True)
    a = json.loads(weighted.read_text())
    assert a["basis"] == b["basis"]
    assert [t["type"] for t in a["tensors"]] != [t["type"] for t in b["tensors"]]


def test_readme_lists_every_architecture_of_the_table():
    from conftest import ROOT
    from lwq_gguf.model.arch import ARCHS

    readme = (ROOT / "README.md").read_text()
    assert all(f"`{a.hf}`" in readme for a in ARCHS)
