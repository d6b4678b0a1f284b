"""A Hugging Face decoder run one piece at a time, straight from its safetensors files.

The model's skeleton is built on PyTorch's ``meta`` device (no memory); a piece (the embedding,
one decoder layer, the final norm + head) gets real weights read from the byte ranges of the
shards (``load.read_tensor``) only while it runs, then goes back to ``meta``. Host and device
memory stay at one layer plus the calibration activations, whatever the model's size, and the
arithmetic is the model's own modules', so the results equal a whole-model forward.
"""

from __future__ import annotations

from lwq_gguf.errors import ModelInputError
from lwq_gguf.load import HFModel, read_tensor

ROW_BLOCK = 1 << 24  # weights read and converted at a time while loading (64 MiB as float32)


class LayerStream:
    """The model's pieces, materialised on ``device`` one at a time."""

    def __init__(self, model: HFModel, device: str, seq_len: int) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.torch, self.model, self.device = torch, model, device
        conf = AutoConfig.from_pretrained(str(model.path))
        window = getattr(conf, "sliding_window", None)
        if window and getattr(conf, "use_sliding_window", True) and seq_len > window:
            raise ModelInputError(f"{model.path}: calibration windows of {seq_len} tokens exceed "
                                  f"the model's sliding window ({window}): use shorter windows")
        with torch.device("meta"):
            self.lm = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa",
                                                       dtype=torch.float32)
        self.lm.eval()
        self.refs = {r.name: r for r in model.tensors}
        self.rotary = type(self.lm.model.rotary_emb)(config=conf, device=device)
        self.tied = bool(getattr(conf, "tie_word_embeddings", False))
        self._positions: dict[int, tuple] = {}  # window length -> (mask, rope, ids)

    @property
    def layers(self):
        return self.lm.model.layers

    def _ref(self, name: str):
        ref = self.refs.get(name) or self.refs.get(name.removeprefix("model."))
        if ref is None and name == "lm_head.weight" and self.tied:
            ref = self.refs.get("model.embed_tokens.weight") or self.refs.get("embed_tokens.weight")
        if ref is None:
            raise ModelInputError(f"{self.model.path}: tensor {name!r} is not in the safetensors "
                                  "files: the checkpoint is incomplete; re-download it")
        return ref

    def load(self, module, prefix: str, half=None):
        """Give ``module`` (named ``prefix`` in the checkpoint) its weights on the device.

        ``half``: round the weights through this 16-bit dtype (what the base GGUF holds)."""
        torch = self.torch
        module.to_empty(device=self.device)
        with torch.no_grad():
            for name, p in module.named_parameters():
                ref = self._ref(f"{prefix}.{name}")
                n = ref.shape[0]
                step = max(1, ROW_BLOCK // max(1, p.numel() // n))
                for i in range(0, n, step):  # in row blocks: no whole-tensor float32 copies
                    a = read_tensor(ref, (i, min(n, i + step)))
                    w = torch.from_numpy(a if a.flags.writeable else a.copy())
                    if half is not None and w.dim() == 2:
                        w = w.to(half).float()
                    p[i:i + step].copy_(w)
        return module

    def unload(self, module) -> None:
        module.to("meta")

    def position(self, h):
        """(mask, position embeddings, position ids) for a [1, T, H] window (made once per T)."""
        from transformers.masking_utils import create_causal_mask

        if h.shape[1] not in self._positions:
            torch = self.torch
            pos = torch.arange(h.shape[1], device=h.device)
            with torch.no_grad():
                mask = create_causal_mask(config=self.lm.config, input_embeds=h,
                                          attention_mask=None, cache_position=pos,
                                          past_key_values=None, position_ids=pos.unsqueeze(0))
                rope = self.rotary(h, pos.unsqueeze(0))
            self._positions[h.shape[1]] = (mask, rope, pos.unsqueeze(0))
        return self._positions[h.shape[1]]

    def run_layer(self, layer, h):
        mask, rope, pos = self.position(h)
        out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope,
                    use_cache=False)
        return out[0] if isinstance(out, (tuple, list)) else out

    def embed(self, windows: list[list[int]], half=None) -> list:
        """The embedding of every window ([1, T, H] each); the embedding is unloaded after."""
        torch = self.torch
        emb = self.load(self.lm.model.embed_tokens, "model.embed_tokens", half)
        with torch.no_grad():
            hs = [emb(torch.tensor([w], device=self.device)) for w in windows]
        self.unload(emb)
        return hs
