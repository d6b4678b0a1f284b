import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lwq_gguf.errors import PlanError
from lwq_gguf.quant.types import (ALL_LADDER, AUTO_LADDER, DEFAULT_LADDER, IQ_BASELINES, QUANT_TYPES,
                                  UNTRUSTED,
                                  default_baselines, legal_type, mix_needs_imatrix, parse_ladder,
                                  quant_type, usable_ladder)


def test_table_matches_gguf_and_design_bpw():
    expected = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625,
                "q8_0": 8.5, "q4_0": 4.5, "q5_0": 5.5, "q5_1": 6.0, "iq4_xs": 4.25, "f16": 16}
    for name, bpw in expected.items():
        assert QUANT_TYPES[name].bpw == bpw
    for q in QUANT_TYPES.values():
        assert (q.block, q.type_size) == GGML_QUANT_SIZES[GGMLQuantizationType[q.name.upper()]]


def test_fallbacks_follow_llama_cpp():
    assert legal_type("q4_k", 768) == "q4_k"
    assert [legal_type(t, 576) for t in DEFAULT_LADDER] == ["q4_0", "q4_0", "q5_0", "q5_1", "q8_0", "q8_0"]
    assert legal_type("iq4_xs", 576) == "iq4_nl"
    assert legal_type("q4_0", 100) == "f16"  # not even 32-aligned


def test_ladder_parsing_sorts_and_rejects_unknown_names():
    assert parse_ladder("q8_0,q2_k,Q4_K") == ("q2_k", "q4_k", "q8_0")
    # equal BPW: by name, whatever the order given (a set's order changes between runs)
    assert parse_ladder("q5_k,q5_0,q4_k,q4_0") == parse_ladder("q4_0,q4_k,q5_0,q5_k") == (
        "q4_0", "q4_k", "q5_0", "q5_k")
    with pytest.raises(PlanError, match="unknown quantization type 'q7_k'.*q4_k"):
        parse_ladder("q2_k,q7_k")
    with pytest.raises(PlanError):
        quant_type("fp8")


I_QUANTS = ("iq4_xs", "iq4_nl", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")


def test_auto_ladder_holds_the_i_quants_and_every_other_type_llama_quantize_writes():
    for name in I_QUANTS + ("mxfp4", "nvfp4", "q4_0", "q5_1", "q2_k", "q8_0"):
        assert name in AUTO_LADDER, name
    assert "tq1_0" in QUANT_TYPES and "tq1_0" not in ALL_LADDER  # ternary: no CUDA kernels
    # the sign-like Q1_0 and Q2_0 (their estimate fails on trained weights: bench/truth.py) only
    # when asked for
    assert set(ALL_LADDER) - set(AUTO_LADDER) == set(UNTRUSTED) == {"q1_0", "q2_0"}
    assert parse_ladder("default") == AUTO_LADDER
    assert parse_ladder("all") == ALL_LADDER and parse_ladder("default,q1_0")[0] == "q1_0"
    assert parse_ladder("k") == DEFAULT_LADDER == ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")
    assert parse_ladder("k,iq4_xs") == ("q2_k", "q3_k", "iq4_xs", "q4_k", "q5_k", "q6_k", "q8_0")
    no_im = usable_ladder(AUTO_LADDER, imatrix=False)
    assert "iq4_xs" in no_im and "iq3_s" in no_im and "iq1_m" not in no_im and "iq3_xxs" not in no_im
    assert usable_ladder(AUTO_LADDER, imatrix=True) == AUTO_LADDER
    # llama.cpp's fallbacks, and the types it refuses on a row they do not fit
    assert legal_type("iq1_m", 576) == legal_type("iq2_xxs", 576) == "iq4_nl"
    assert legal_type("q2_0", 576) == "q2_0" and legal_type("q2_0", 608) == "q4_0"
    assert legal_type("mxfp4", 576) == "mxfp4"
    assert legal_type("q1_0", 576) is None and legal_type("nvfp4", 576 + 32) is None
    assert legal_type("q1_0", 768) == "q1_0"


def test_imatrix_rule_matches_the_pinned_llama_cpp():
    """The types lwq-gguf offers only with an imatrix are those llama-quantize refuses without
    one (tensor_requires_imatrix in the pinned src/llama-quant.cpp)."""
    import re

    from lwq_gguf.llamacpp import find_llama_cpp

    src = (find_llama_cpp().src / "src" / "llama-quant.cpp").read_text()
    body = src[src.index("static bool tensor_requires_imatrix"):]
    body = body[:body.index("case GGML_TYPE_Q2_K")]
    refused = {m.lower() for m in re.findall(r"case GGML_TYPE_(\w+):", body)}
    assert refused == {n for n, q in QUANT_TYPES.items() if q.needs_imatrix}


def test_baselines_add_the_i_quant_mixes_with_an_imatrix():
    assert default_baselines(imatrix=False)[:3] == ("Q2_K", "Q3_K_S", "Q3_K_M")
    assert not set(IQ_BASELINES) & set(default_baselines(imatrix=False))
    assert set(IQ_BASELINES) <= set(default_baselines(imatrix=True))
    assert mix_needs_imatrix("IQ2_M") and mix_needs_imatrix("IQ3_XXS")
    assert not mix_needs_imatrix("IQ4_XS") and not mix_needs_imatrix("IQ3_M")
