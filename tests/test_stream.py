"""Streamed (one layer at a time) scoring equals the whole-model forward."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lwq_gguf.load import open_model
from lwq_gguf.score import ScoreConfig, calibration_ids, lim_scores


def whole_model_lim(path, ids, seq_len):
    """The reference: LIM from forward hooks on the whole transformers model."""
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    sums, count = [0.0] * len(lm.model.layers), [0]

    def hook_for(i):
        def hook(_mod, args, kwargs, out):
            h_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            h_out = out[0] if isinstance(out, (tuple, list)) else out
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
            sums[i] += float(cos.double().sum())
            count[0] += cos.numel() if i == 0 else 0
        return hook

    for i, layer in enumerate(lm.model.layers):
        layer.register_forward_hook(hook_for(i), with_kwargs=True)
    with torch.no_grad():
        for s in range(0, len(ids), seq_len):
            lm.model(input_ids=torch.tensor([ids[s: s + seq_len]]), use_cache=False)
    return [-x / count[0] for x in sums]


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen3", True), ("mistral", False)])
def test_streamed_lim_equals_whole_model(tiny, arch, tied):
    path = tiny(arch, 3, tied=tied)
    model = open_model(path)
    cfg = ScoreConfig(calib_tokens=700, device="cpu")  # a full window and a short one
    ids = calibration_ids(model, cfg)
    streamed, device = lim_scores(model, cfg, ids, progress=False)
    assert device == "cpu" and len(streamed) == 3
    reference = whole_model_lim(path, ids, cfg.seq_len)
    assert max(abs(a - b) for a, b in zip(streamed, reference)) < 1e-4, (streamed, reference)
