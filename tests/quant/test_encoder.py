"""lwq-gguf's own Q4_K encoder: ggml's format read back by ggml, lower error than ggml's encoder."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from conftest import error_line, run_cli
from lwq_gguf.quant.encoder import Quantizer, damage_key, split_damage_key
from lwq_gguf.llamacpp import find_llama_cpp


@pytest.fixture(scope="module")
def quantizers():
    lc = find_llama_cpp()
    return Quantizer(lc, "lwq"), Quantizer(lc, "ggml")


def weighted_mse(w, y, im):
    return float(np.mean((w - y) ** 2 * (1 if im is None else im)))


def q41_grid(rng, rows, cols):
    """Weights that sit exactly on a Q4_1 grid (32-blocks of d*q + m), like the demo model's."""
    blocks = rows * cols // 32
    d = rng.uniform(0.002, 0.02, (blocks, 1)).astype(np.float16).astype(np.float32)
    m = -rng.uniform(0.01, 0.15, (blocks, 1)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (blocks, 32))
    q[:, 0], q[:, 1] = 0, 15  # every block spans its grid
    return (d * q + m).reshape(rows, cols).astype(np.float32)


@pytest.mark.parametrize("kind", ["gauss", "t4", "q4_1-grid"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_lwq_q4_k_is_read_by_ggml_and_beats_ggmls_encoder(quantizers, kind, with_imatrix):
    lwq, ggml = quantizers
    rng = np.random.default_rng(1)
    rows, cols = 256, 512
    w = {"gauss": lambda: rng.standard_normal((rows, cols)) * 0.02,
         "t4": lambda: rng.standard_t(4, (rows, cols)) * 0.02,
         "q4_1-grid": lambda: q41_grid(rng, rows, cols)}[kind]().astype(np.float32)
    im = rng.uniform(0.1, 10, cols).astype(np.float32) if with_imatrix else None
    data = lwq.quantize(w, "q4_k", im)
    assert len(data) == rows * cols // 256 * 144  # block_q4_K: same size as ggml's
    y = lwq.dequantize(data, "q4_k", w.shape)  # ggml's own dequantizer reads our blocks
    assert np.isfinite(y).all()
    ours, theirs = weighted_mse(w, y, im), weighted_mse(w, ggml.roundtrip(w, "q4_k", im), im)
    assert ours < (0.6 if kind == "q4_1-grid" else 1.0) * theirs, (ours, theirs)
    assert lwq.quantize(w, "q4_k", im) == data  # deterministic
    # other types are ggml's bytes
    assert lwq.quantize(w, "q6_k", im) == ggml.quantize(w, "q6_k", im)


def test_damage_keys_carry_the_encoder():
    assert split_damage_key(damage_key("file:ab12", "ggml")) == ("file:ab12", "ggml")
    assert split_damage_key(damage_key("auto", "lwq")) == ("auto", "lwq")
    assert damage_key("none", "lwq") != damage_key("none", "ggml")


@pytest.mark.slow
def test_convert_writes_lwq_q4_k_and_two_step_needs_ggml_encoder(tiny, tmp_path):
    model = tiny("llama", 2)
    args = ("-q", "convert", model, "--avg-bits", "4.68", "--ladder", "q4_k,q8_0",
            "--calib-tokens", "512", "--imatrix", "none")
    ours, plain = tmp_path / "lwq.gguf", tmp_path / "ggml.gguf"
    run_cli(*args, "-o", ours, check=True)  # verified: read back and run by llama.cpp
    run_cli(*args, "-o", plain, "--encoder", "ggml", "--no-verify", check=True)
    a = {t.name: t for t in GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in GGUFReader(str(plain)).tensors}
    q4k = [n for n, t in a.items() if t.tensor_type == GGMLQuantizationType.Q4_K]
    assert q4k and all(b[n].tensor_type == GGMLQuantizationType.Q4_K for n in q4k)
    assert any(bytes(a[n].data) != bytes(b[n].data) for n in q4k)
    assert all(bytes(a[n].data) == bytes(b[n].data) for n in a if n not in q4k)
    assert '"encoder":"lwq"' in bytes(GGUFReader(str(ours)).fields["lwq.plan"].parts[-1]).decode()

    p = run_cli(*args, "-o", tmp_path / "two.gguf", "--two-step")
    assert "--encoder ggml" in error_line(p)
    assert not (tmp_path / "two.gguf").exists()


def test_degenerate_blocks_decode_to_finite_values(quantizers):
    """Zero, constant, one-spike, all-positive and subnormal blocks; zero importance weights."""
    lwq = quantizers[0]
    rng = np.random.default_rng(2)
    rows = np.zeros((6, 512), dtype=np.float32)
    rows[1] = 0.25
    rows[2, 7] = 40.0
    rows[3] = rng.uniform(0.5, 1.0, 512)
    rows[4] = rng.standard_normal(512) * 1e-7
    rows[5] = rng.standard_normal(512)
    for im in (None, np.zeros(512, np.float32), rng.uniform(0, 1, 512).astype(np.float32)):
        data = lwq.quantize(rows, "q4_k", im)
        y = lwq.dequantize(data, "q4_k", rows.shape)
        assert np.isfinite(y).all() and lwq.quantize(rows, "q4_k", im) == data
        assert not y[0].any()  # zeros stay zeros
        assert np.abs(rows - y).max() < 0.05 * np.abs(rows).max()


def pinned_rows() -> tuple[np.ndarray, np.ndarray]:
    """Weights and imatrix from integer arithmetic only (the same floats on every machine)."""
    i = np.arange(64 * 1024, dtype=np.uint64)
    u = ((i * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(1 << 32)).astype(np.float64)
    u = u / 2**32 - 0.5
    w = (0.05 * u + 0.3 * u**5).astype(np.float32).reshape(64, 1024)  # heavy-ish tails
    w[3, 40] = 2.0  # one spike
    im = (((np.arange(1024) * 40503) % 997) / 997.0 + 1e-3).astype(np.float32) ** 3
    return w, im


# sha256 of lwq_quantize_q4_k's output on pinned_rows(), without and with the imatrix: any change
# to the encoder's bytes (a rewrite, a compiler flag, another machine) shows here. Change these
# only together with a re-measured bench/quality.py.
PINNED = ("95011add90fcf9ee5cefcbe65b151bc88eee648e5d9ef7ea4ad44ddabe634c69",
          "38b444e038cd00275774ba87394ed615dc7c03690a408a62267bf05699826c3a")


def test_encoder_bytes_are_pinned(quantizers):
    import hashlib

    w, im = pinned_rows()
    got = tuple(hashlib.sha256(quantizers[0].quantize(w, "q4_k", m)).hexdigest() for m in (None, im))
    assert got == PINNED
