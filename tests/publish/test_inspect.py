"""`lwq-gguf inspect` on llama.cpp's own mixes and on lwq-gguf's files; `convert --recipe`."""

import json

import pytest

from conftest import error_line, run_cli
from lwq_gguf.llamacpp import find_llama_cpp, run_tool
from lwq_gguf.model.inventory import write_16bit
from lwq_gguf.quant.gguf_file import read_back


@pytest.fixture(scope="module")
def mixes(tiny, tmp_path_factory):
    """An 8-layer tiny Llama: its F16 GGUF and llama-quantize's Q4_K_M and Q4_K_S of it."""
    model, lc = tiny("llama", 8), find_llama_cpp()
    d = tmp_path_factory.mktemp("mixes")
    out = {"model": model, "F16": d / "f16.gguf"}
    write_16bit(lc, model, out["F16"])
    for mix in ("Q4_K_M", "Q4_K_S"):
        out[mix] = d / f"{mix}.gguf"
        run_tool([str(lc.tool("llama-quantize")), str(out["F16"]), str(out[mix]), mix],
                 what="llama-quantize")
    return out


def test_inspect_shows_llama_cpp_q4_k_m_pattern(mixes):
    q = mixes["Q4_K_M"]
    doc = json.loads(run_cli("inspect", q, "--json", check=True).stdout)
    f = doc["files"][0]
    info = read_back(q)
    assert f["architecture"] == "llama" and f["lwq_plan"] is None and "diff" not in doc
    assert f["file_bytes"] == q.stat().st_size and abs(f["bpw"] - info.bpw) < 1e-3
    assert f["tensor_types"] == info.types and len(f["layers"]) == 8
    # llama.cpp's Q4_K_M at the pin: ffn_down and attn_v get Q6_K where use_more_bits(i, 8)
    # holds (i < n/8, i >= 7n/8, (i - n/8) % 3 == 2), Q4_K elsewhere
    for kind in ("ffn_down", "attn_v"):
        bumped = {int(k) for k, m in f["layers"].items() if m[kind] == "q6_k"}
        assert bumped == {0, 3, 6, 7}, (kind, f["layers"])
        assert {m[kind] for m in f["layers"].values()} == {"q4_k", "q6_k"}
    assert {m["attn_q"] for m in f["layers"].values()} == {"q4_k"}
    assert f["embed_output"]["output.weight"] == "q6_k"
    text = run_cli("inspect", q, check=True).stdout
    assert "none (not written by lwq-gguf)" in text and "ffn_down" in text


def test_inspect_diff_and_png(mixes, tmp_path):
    a, b = mixes["Q4_K_M"], mixes["Q4_K_S"]
    doc = json.loads(run_cli("inspect", a, b, "--json", check=True).stdout)
    ta, tb = read_back(a).types, read_back(b).types
    want = sorted(n for n in ta if ta[n] != tb[n])
    assert sorted(c["tensor"] for c in doc["diff"]["changed"]) == want and want
    kinds = doc["diff"]["kinds"]
    assert sum(k["a_bytes"] for k in kinds.values()) == read_back(a).nbytes
    assert sum(k["b_bytes"] for k in kinds.values()) == read_back(b).nbytes
    assert kinds["ffn_down"]["a_bytes"] > kinds["ffn_down"]["b_bytes"]  # Q4_K_M bumps more
    png = tmp_path / "map.png"
    p = run_cli("inspect", a, b, "--png", png, check=True)
    assert f"{len(want)} tensor(s) typed differently" in p.stdout
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[1] > 600
    assert "exists" in error_line(run_cli("inspect", a, "--png", png))  # never clobbered


def test_inspect_bad_input(mixes, tmp_path):
    notgguf = tmp_path / "x.gguf"
    notgguf.write_text("hello")
    assert "not a readable GGUF" in error_line(run_cli("inspect", notgguf))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(mixes["Q4_K_M"].read_bytes()[:50000])
    line = error_line(run_cli("inspect", cut))
    assert str(cut) in line and "not a readable GGUF" in line
    assert "no such file" in error_line(run_cli("inspect", tmp_path / "none.gguf"))
    assert "one or two" in error_line(run_cli("inspect", cut, cut, cut))


def tensor_bytes(path):
    from gguf import GGUFReader

    return {t.name: bytes(t.data.tobytes()) for t in GGUFReader(str(path)).tensors}


@pytest.mark.slow
def test_recipe_reproduces_llama_quantize_and_refuses_other_shapes(mixes, tiny, tmp_path):
    """--recipe Q4_K_M.gguf with llama-quantize's encoder and no imatrix: the very tensors
    llama-quantize wrote; a recipe of a model of another depth: one line, nothing written."""
    out = tmp_path / "r.gguf"
    p = run_cli("-q", "convert", mixes["model"], "--recipe", mixes["Q4_K_M"], "-o", out,
                "--imatrix", "none", "--encoder", "ggml", "--calib-tokens", "256", check=True)
    assert "recipe of Q4_K_M.gguf" in p.stdout
    assert read_back(out).types == read_back(mixes["Q4_K_M"]).types
    assert tensor_bytes(out) == tensor_bytes(mixes["Q4_K_M"])
    diff = json.loads(run_cli("inspect", out, mixes["Q4_K_M"], "--json", check=True).stdout)
    assert diff["diff"]["changed"] == [] and diff["files"][0]["lwq_plan"]["encoder"] == "ggml"

    other = tmp_path / "o.gguf"
    line = error_line(run_cli("convert", tiny("llama", 2), "--recipe", mixes["Q4_K_M"], "-o",
                              other))
    assert str(mixes["Q4_K_M"]) in line and "architecture" in line and not other.exists()
    line = error_line(run_cli("convert", mixes["model"], "--recipe", mixes["Q4_K_M"],
                              "--avg-bits", "4", "-o", other))
    assert "drop --avg-bits" in line
    line = error_line(run_cli("convert", mixes["model"], "--recipe", tmp_path / "none.gguf",
                              "-o", other))
    assert "no such file" in line and not other.exists()
