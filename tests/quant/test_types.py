import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lwq_gguf.errors import PlanError
from lwq_gguf.quant.types import DEFAULT_LADDER, QUANT_TYPES, legal_type, parse_ladder, quant_type


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
