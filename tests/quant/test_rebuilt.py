"""The rebuilt quantizers (lwq_gguf.quant.rebuilt) write the pinned library's bytes, every type."""

from pathlib import Path

import numpy as np
import pytest

from conftest import error_line, run_cli

from lwq_gguf.errors import ToolError
from lwq_gguf.llamacpp import LlamaCpp, find_llama_cpp
from lwq_gguf.quant.ggml import Ggml
from lwq_gguf.quant.rebuilt import PatchError, Rebuilt, patched_source
from lwq_gguf.quant.types import FLOAT_TYPES, GGML_NEEDS_IMATRIX, QUANT_TYPES



@pytest.fixture(scope="module")
def both():
    lc = find_llama_cpp()
    return Ggml(lc), Ggml(lc, rebuilt=False)


def weights(kind: str, rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    if kind == "gauss":
        w = rng.standard_normal((rows, cols)) * 0.02
    elif kind == "t3":  # heavy tails: outliers far off every grid
        w = rng.standard_t(3, (rows, cols)) * 0.02
    elif kind == "q4_1-grid":  # on a 4-bit grid, as the demo model's weights are
        d = rng.uniform(0.002, 0.02, (rows * cols // 32, 1))
        w = (d * rng.integers(0, 16, (rows * cols // 32, 32)) - 8 * d).reshape(rows, cols)
    else:  # sparse: whole blocks of zeros and a few large weights
        w = rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < 0.05)
        w[:, :256] = 0
    return w.astype(np.float32)


def test_the_rebuilt_library_is_in_use_here(both):
    fast, _ = both
    assert fast.why_not_rebuilt == "" and fast.rebuilt is not None
    quantized = set(QUANT_TYPES) - set(FLOAT_TYPES)
    assert set(fast.rebuilt.fns) == quantized


@pytest.mark.parametrize("kind", ["gauss", "t3", "q4_1-grid", "sparse"])
def test_every_type_gives_the_pinned_librarys_bytes(both, kind):
    fast, pinned = both
    rng = np.random.default_rng(7)
    w = weights(kind, rng, 48, 1024)
    imatrices = [rng.uniform(0.01, 20, 1024).astype(np.float32), None]
    for ty in sorted(fast.rebuilt.fns):
        for im in imatrices:
            if im is None and ty in GGML_NEEDS_IMATRIX:
                continue
            assert fast.quantize(w, ty, im) == pinned.quantize(w, ty, im), (ty, im is None)


def test_without_an_imatrix_the_types_that_need_one_are_refused(both):
    fast, _ = both
    with pytest.raises(ValueError, match="importance matrix"):
        fast.quantize(np.zeros((1, 256), np.float32), "iq2_xs", None)


def test_a_source_the_patch_does_not_match_is_refused():
    src = (find_llama_cpp().src / "ggml" / "src" / "ggml-quants.c").read_text()
    assert "lwq_sort_dist2" in patched_source(src)
    with pytest.raises(PatchError, match="iq2_compare_func"):
        patched_source(src.replace("qsort(dist2, grid_size, 2*sizeof(int), iq2_compare_func);", ""))


def test_without_the_source_the_pinned_library_quantizes(tmp_path: Path):
    lc = find_llama_cpp()
    bare = tmp_path / "llama.cpp"
    (bare / "src").mkdir(parents=True)
    (bare / "bin").symlink_to(lc.bin)
    lib, why = Rebuilt.load(LlamaCpp(bare))
    assert lib is None and "ggml-quants.c" in why
    g = Ggml(LlamaCpp(bare))
    assert g.rebuilt is None and g.why_not_rebuilt == why
    w = weights("gauss", np.random.default_rng(1), 4, 256)
    assert g.quantize(w, "iq4_xs", None) == Ggml(lc).quantize(w, "iq4_xs", None)


def test_lwq_quantizers_chooses_the_pinned_library(monkeypatch):
    lc = find_llama_cpp()
    monkeypatch.setenv("LWQ_QUANTIZERS", "pinned")
    g = Ggml(lc)
    assert g.rebuilt is None and g.why_not_rebuilt == "LWQ_QUANTIZERS=pinned"
    monkeypatch.setenv("LWQ_QUANTIZERS", "fast")
    with pytest.raises(ToolError, match="LWQ_QUANTIZERS='fast': use rebuilt or pinned"):
        Ggml(lc)
    p = run_cli("score", "models/nowhere", "-o", "s.json")  # refused before anything is read
    assert p.returncode != 0 and error_line(p) == (
        "lwq-gguf: error: LWQ_QUANTIZERS='fast': use rebuilt or pinned")


def test_the_paths_without_avx512_give_the_same_bytes(both):
    """A CPU without AVX-512 runs the rewrites' scalar paths (the tabled neighbour search, ggml's
    own trial loops): built here with AVX-512 off, they must give the same bytes too."""
    _, pinned = both
    portable, why = Rebuilt.load(find_llama_cpp(), ("-mno-avx512f",))
    assert portable is not None, why
    g = Ggml(find_llama_cpp(), rebuilt=False)
    g.rebuilt = portable
    rng = np.random.default_rng(3)
    for kind in ("t3", "q4_1-grid"):
        w = weights(kind, rng, 16, 1024)
        im = rng.uniform(0.01, 20, 1024).astype(np.float32)
        for ty in sorted(portable.fns):
            assert g.quantize(w, ty, im) == pinned.quantize(w, ty, im), (kind, ty)
