"""The real trained model from `make models`: Gemma 3 270M rebuilt from its PyPI Q4_K_M GGUF."""

import pytest

from lwq_gguf.evaluate.perplexity import EvalConfig, evaluate
from lwq_gguf.evaluate.runner import vocab_tokens
from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.score.scores import default_calibration
from lwq_gguf.model.inventory import write_16bit

pytestmark = pytest.mark.slow  # a 268M-parameter model


@pytest.fixture(scope="module")
def gemma_f16(gemma_model, tmp_path_factory):
    """The rebuilt folder's F16 GGUF, by the pinned convert_hf_to_gguf.py."""
    out = tmp_path_factory.mktemp("gemma") / "gemma3-270m-F16.gguf"
    write_16bit(find_llama_cpp(), gemma_model[0], out, "f16")
    return out


def test_f16_reproduces_the_packaged_file(gemma_model, gemma_f16):
    """The rebuilt model's F16 GGUF gives the packaged file's perplexity within 1 % (its
    weights are the packaged file's, dequantized; F16 rounds them)."""
    lc = find_llama_cpp()
    cfg = EvalConfig(ctx=512, chunks=3)
    ours = evaluate(gemma_f16, default_calibration(), lc, cfg, progress=False)
    packaged = evaluate(gemma_model[1], default_calibration(), lc, cfg, progress=False)
    assert 5 < packaged.ppl < 200  # a real trained model on English text
    assert abs(ours.ppl / packaged.ppl - 1) < 0.01, (ours.ppl, packaged.ppl)


def test_transformers_and_llama_cpp_tokenize_alike(gemma_model, gemma_f16):
    """The folder's tokenizer (transformers) and the converted GGUF's vocabulary (llama.cpp)
    give the same tokens, on prose, digits, code, whitespace runs and non-Latin text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_model[0])
    text = (default_calibration().read_text()[:6000]
            + "\n\n  x = 12345 + 0.5;\tdef f(a):\n    return a**2  # ok\n"
            + "Grüße aus Köln — naïve café. 東京は日本の首都です。 Привет, мир! 🙂\n")
    # (as llama-perplexity does, a literal "<unk>" in the text is text, not the special token)
    hf = tok(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]
    lc = find_llama_cpp()
    assert vocab_tokens(lc, gemma_f16, text.encode()) == hf
    assert vocab_tokens(lc, gemma_model[1], text.encode()) == hf  # the packaged vocabulary too
    assert len(hf) > 1000


def test_calibration_tokens_are_llama_imatrix_s(gemma_model, gemma_f16):
    """Scoring reads the calibration text as llama-imatrix does: its literal "<unk>" strings
    (WikiText's, dozens per 4,096 tokens) are text, not Gemma's special <unk> token, and every
    window starts with BOS (the window's first token replaced, as llama.cpp does per chunk)."""
    from lwq_gguf.model.load import open_model
    from lwq_gguf.score.layers import calibration_ids
    from lwq_gguf.score.scores import ScoreConfig

    cfg = ScoreConfig(calib_tokens=2048, seq_len=512)
    ids = calibration_ids(open_model(gemma_model[0]), cfg)
    raw = default_calibration().read_bytes()
    raw = raw[:raw.index(b"\n", 40_000)]
    assert raw[:12_000].count(b"<unk>") > 20
    ref = vocab_tokens(find_llama_cpp(), gemma_f16, raw)
    bos = ref[0]
    ref = ref[1:2049]
    for i in range(0, len(ref), cfg.seq_len):
        ref[i] = bos
    assert ids == ref
