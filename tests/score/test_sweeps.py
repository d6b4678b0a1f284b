"""The quantizer sweeps (score.sweeps), and the thinning experiment: searched types measured on
a quarter of the rows, scaled by a control."""

import numpy as np
import pytest

from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.quant.encoder import Quantizer
from lwq_gguf.quant.types import ALL_LADDER, QUANT_TYPES
from lwq_gguf.score.sample import FisherTensor
from lwq_gguf.score.sweeps import (CONTROLS, NO_THINNING, Thinning, control_for,
                                   controls_needed, finish, sweep, tensor_damage)


@pytest.fixture(scope="module")
def quantizer():
    return Quantizer(find_llama_cpp(), "ggml")


def test_thinning_rows():
    t = Thinning(every=4, min_rows=16)
    assert t.rows(16) is None and t.rows(10) is None  # nothing to thin
    rows = t.rows(200)
    assert len(rows) == 50 and rows[0] == 0 and rows[-1] == 199 and np.all(np.diff(rows) > 0)
    assert len(t.rows(40)) == 16
    assert NO_THINNING.rows(1000) is None


def test_controls_are_plain_rounding_and_fit_the_row():
    for ty in ALL_LADDER:
        c = control_for(ty, 4096)
        assert (c is None) == (not QUANT_TYPES[ty].searched)
        if c is not None:
            assert c in CONTROLS and not QUANT_TYPES[c].searched
            assert abs(QUANT_TYPES[c].bpw - QUANT_TYPES[ty].bpw) <= 0.75
    assert control_for("iq3_xxs", 4096) == "q3_k"
    assert control_for("iq4_xs", 4096) == "q4_0"
    # 576-wide rows take no 256-block control: Q3_K's place goes to a 32-block one
    assert QUANT_TYPES[control_for("iq4_nl", 576)].block == 32
    assert controls_needed(["iq2_xs", "q4_k", "q8_0"], 4096, Thinning()) == ["q2_0", "q4_0"]
    assert controls_needed(["iq2_xs"], 4096, NO_THINNING) == []


def test_sweeps_unthinned_by_default_and_thinned_by_their_control(quantizer):
    """Unthinned (the default), a sweep is tensor_damage itself; thinned, a searched type is
    its damage on the thinned rows times its control's whole-sample / thinned-rows damage, and
    a control is its whole-sample damage."""
    from lwq_gguf.score.sensitivity import SensitivityRequest

    assert SensitivityRequest(ladder=("q4_k",), keys=("auto",)).thinning == NO_THINNING
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((128, 512)) * rng.uniform(0.005, 0.05, (128, 1))).astype(np.float32)
    f = (rng.random((128, 512)) * 10 ** rng.uniform(-3, 1, (128, 1))).astype(np.float32)
    im = (rng.random(512) + 0.1).astype(np.float32)
    ft = FisherTensor("blk.0.ffn_up.weight", w, f, 1024, np.arange(128))
    types = ["iq4_xs", "q4_k", "q8_0"]
    whole = tensor_damage(quantizer, w, f, types + ["q4_0"], im)
    for ty in types:
        assert sweep(quantizer, ft, f, ty, im, NO_THINNING).damage == whole[ty]
    thin = Thinning(every=4)
    swept = {ty: sweep(quantizer, ft, f, ty, im, thin)
             for ty in types + controls_needed(types, 512, thin)}
    keep = thin.rows(128)
    part = tensor_damage(quantizer, w[keep], f[keep], ["iq4_xs", "q4_0"], im)
    got = finish(swept, 512)
    assert swept["q8_0"].control is None and got["q8_0"] == whole["q8_0"]
    assert got["q4_0"] == whole["q4_0"]
    assert got["iq4_xs"] == pytest.approx(part["iq4_xs"] * whole["q4_0"] / part["q4_0"], rel=1e-12)
