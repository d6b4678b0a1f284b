"""The quantizer sweeps (score.sweeps): the damage of each type on a tensor's sampled rows, with
the pinned ggml's own quantizers, and the runtime floor added per type."""

import numpy as np
import pytest

from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.quant.encoder import Quantizer
from lwq_gguf.score import sweeps
from lwq_gguf.score.sweeps import runtime_floor, tensor_damage

TYPES = ["iq4_xs", "q4_k", "iq2_xs", "q8_0"]


@pytest.fixture(scope="module")
def quantizer():
    return Quantizer(find_llama_cpp(), "ggml")


def rows(seed: int, n: int = 128, k: int = 512):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.005, 0.05, (n, 1))).astype(np.float32)
    f = (rng.random((n, k)) * 10 ** rng.uniform(-3, 1, (n, 1))).astype(np.float32)
    return w, f


def test_damage_is_half_the_fisher_weighted_squared_error(quantizer, monkeypatch):
    """1/2 sum F (w - Q(w))^2 with ggml's round trip, the same when split into row blocks."""
    w, f = rows(1)
    im = (np.random.default_rng(2).random(512) + 0.1).astype(np.float32)
    got = tensor_damage(quantizer, w, f, TYPES, im)
    for ty in TYPES:
        e = (w - quantizer.roundtrip(w, ty, im)).astype(np.float64)
        assert got[ty] == pytest.approx(0.5 * float(np.sum(f * e * e)), rel=1e-9)
    assert got["iq2_xs"] > got["q4_k"] > got["q8_0"] > 0
    monkeypatch.setattr(sweeps, "BLOCK", 16 * 512)  # 16 rows a step: rows quantize alone
    split = tensor_damage(quantizer, w, f, TYPES, im)
    assert split == pytest.approx(got, rel=1e-12)


def test_merged_experts_each_quantized_with_their_own_imatrix(quantizer):
    w, f = rows(3)
    experts = np.repeat(np.arange(4), 32)
    per_expert = (np.random.default_rng(4).random((4, 512)) ** 4 + 1e-3).astype(np.float32)
    got = tensor_damage(quantizer, w, f, ["iq4_xs"], per_expert.reshape(-1), experts)["iq4_xs"]
    want = 0.0
    for x in range(4):
        sel = experts == x
        e = (w[sel] - quantizer.roundtrip(w[sel], "iq4_xs", per_expert[x])).astype(np.float64)
        want += 0.5 * float(np.sum(f[sel] * e * e))
    assert got == pytest.approx(want, rel=1e-9)
    shared = tensor_damage(quantizer, w, f, ["iq4_xs"], per_expert[0])["iq4_xs"]
    assert shared != pytest.approx(got, rel=1e-6)  # the experts' own imatrices were used


def test_runtime_floor_by_activation_block():
    floor = {32: 0.5, 256: 2.0}
    assert runtime_floor(floor, "q4_0") == 0.5 and runtime_floor(floor, "iq4_nl") == 0.5
    assert runtime_floor(floor, "q4_k") == 2.0 and runtime_floor(floor, "iq2_xs") == 2.0
    assert runtime_floor(floor, "f16") == 0.0 and runtime_floor(floor, "bf16") == 0.0
    assert runtime_floor(None, "q4_k") == 0.0 and runtime_floor({32: 1.0}, "q4_k") == 0.0
