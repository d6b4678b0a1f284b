"""A Hugging Face decoder run one piece at a time, straight from its safetensors files.

The model's skeleton is built on PyTorch's ``meta`` device (no memory); a piece (the embedding,
one decoder layer, the final norm + head) gets real weights read from the byte ranges of the
shards (``load.read_raw``) only while it runs, then goes back to ``meta``. Host and device
memory stay at one layer plus the calibration activations, whatever the model's size, and the
arithmetic is the model's own modules', so the results equal a whole-model forward.
"""

from __future__ import annotations

import numpy as np

from lwq_gguf.errors import ModelInputError, UnsupportedModelError
from lwq_gguf.model.arch import SCORED, arch_of, layer_mask_kind
from lwq_gguf.model.heap import keep_heap, weights_mapped
from lwq_gguf.model.load import HFModel, read_raw

ROW_BLOCK = 1 << 24  # weights read and converted at a time while loading (64 MiB as float32)


def _row_blocks(torch, ref, step: int):
    """A tensor's rows ``step`` at a time: (first row, a CPU tensor of the file's own dtype,
    straight from its bytes; widened to float32 where it is copied, in one multithreaded pass)."""
    dtype = _torch_dtypes()[ref.dtype]
    n = ref.shape[0]
    for i in range(0, n, step):
        buf, shape = read_raw(ref, (i, min(n, i + step)))
        yield i, torch.from_numpy(buf).view(dtype).reshape(shape)


def gpu_placement(lm, max_memory: dict) -> dict[str, str]:
    """Which pieces (embedding, decoder layers, norm, head) stay resident on which GPU.

    accelerate's ``infer_auto_device_map`` fills the GPUs in ``max_memory`` ({index: bytes}, room
    for the streamed work already taken off) in layer order, a decoder layer never split; what
    it leaves to the host is streamed through the main device instead."""
    import warnings

    from accelerate import infer_auto_device_map

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its advice on offloaded buffers: we stream those
        dmap = infer_auto_device_map(lm, max_memory={**max_memory, "cpu": 1 << 60},
                                     no_split_module_classes=[type(lm.model.layers[0]).__name__])
    pieces = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(len(lm.model.layers))),
              "model.norm", "lm_head"]
    out = {}
    for piece in pieces:  # the most specific entry covering the piece ("" covers all)
        keys = [k for k in dmap if k == "" or piece == k or piece.startswith(k + ".")]
        dev = dmap[max(keys, key=len)] if keys else None
        if isinstance(dev, int):
            out[piece] = f"cuda:{dev}"
    return out


def auto_gpu_placement(lm, seq_len: int, device: str) -> dict[str, str]:
    """--device-map auto: every visible GPU's free memory, less room for one streamed layer
    (weights, gradients and Fisher: 3x the largest layer) and the activations, to accelerate.
    No GPU (or ``device`` cpu): nothing placed, every piece streams."""
    import torch

    n = torch.cuda.device_count() if device != "cpu" else 0
    if n == 0:
        return {}
    layer = max(sum(p.numel() for p in m.parameters()) for m in lm.model.layers) * 4
    acts = 64 * seq_len * lm.config.hidden_size * 4
    room = {}
    for i in range(n):
        free = torch.cuda.mem_get_info(i)[0]
        room[i] = max(0, int(0.9 * free) - (3 * layer + acts if i == 0 else 0))
    return gpu_placement(lm, room)


def _torch_dtypes() -> dict:
    """{safetensors dtype: torch dtype} of the float types a checkpoint's weights come in."""
    import torch

    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class LayerStream:
    """The model's pieces, materialised on ``device`` one at a time.

    ``placement`` ({piece: device}, or "auto": :func:`auto_gpu_placement`, ``--device-map auto``):
    those pieces are loaded on their device once and stay there; activations follow them."""

    def __init__(self, model: HFModel, device: str, seq_len: int,
                 placement: str | dict[str, str] | None = None) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.torch, self.model, self.device = torch, model, device
        keep_heap()  # (model.heap: temporaries reused, a piece's weights mapped)
        conf = AutoConfig.from_pretrained(str(model.path))
        arch = arch_of(model.architecture)
        if arch is None:
            raise UnsupportedModelError(
                f"{model.path}: lwq-gguf runs no forward pass of {model.architecture} (it does for "
                f"{', '.join(SCORED)}): use --strategy zd, or auto for a plan from weight error")
        self.arch = arch
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):  # weights on meta, buffers computed
            self.lm = AutoModelForCausalLM.from_config(conf, attn_implementation=self.arch.attention,
                                                       dtype=torch.float32)
        self.lm.tie_weights()  # (accelerate's context gave the tied output its own meta weight)
        self.lm.eval()
        # the buffers (an embedding scale, rotary frequencies: no checkpoint holds them) as the
        # model's constructor computed them, restored whenever a piece is loaded
        self._buffers = {n: b.detach().clone() for n, b in self.lm.named_buffers()}
        self.refs = {r.name: r for r in model.tensors}
        # the rotary modules hold no weights: rebuilt on the device from their own configs
        self.rope = {kw: type(m)(config=m.config, device=device) for kw, m in
                     ((kw, getattr(self.lm.model, attr)) for kw, attr in self.arch.rope)}
        self.mask_kinds = [layer_mask_kind(self.arch, self.lm.config, i)
                           for i in range(len(self.lm.model.layers))]
        self.softcap = getattr(conf, "final_logit_softcapping", None)  # logits = c tanh(z / c)
        # what the embedding rows are multiplied by on the way in: a scale inside the module (a
        # buffer, Gemma 3) and one applied after it (Gemma 2)
        inside = self._buffers.get("model.embed_tokens.embed_scale")
        self.embed_scale = (float(inside) if inside is not None else 1.0) * (
            conf.hidden_size ** 0.5 if self.arch.embed_scale else 1.0)
        self.tied = bool(getattr(conf, "tie_word_embeddings", False)) or not self.arch.own_output
        self._positions: dict[tuple, tuple] = {}  # (window length, device) -> (masks, rope, ids)
        if placement == "auto":
            placement = auto_gpu_placement(self.lm, seq_len, device)
        self.placement = dict(placement) if isinstance(placement, dict) else {}  # "none": {}
        if self.placement.get("model.norm") != self.placement.get("lm_head"):  # one device
            self.placement.pop("model.norm", None)
            self.placement.pop("lm_head", None)
        self._prefix = {id(m): name for name, m in self.lm.named_modules()}
        self._index = {id(m): i for i, m in enumerate(self.lm.model.layers)}
        self._resident: set[str] = set()  # placed pieces already loaded

    @property
    def layers(self):
        return self.lm.model.layers

    def ref(self, name: str):
        """The safetensors reference of HF weight ``name`` (a tied output: the embedding's)."""
        if name == "lm_head.weight" and self.tied:  # the output is the token embedding
            name = "model.embed_tokens.weight"
        ref = self.refs.get(name) or self.refs.get(name.removeprefix("model."))
        if ref is None:
            raise ModelInputError(f"{self.model.path}: tensor {name!r} is not in the safetensors "
                                  "files: the checkpoint is incomplete; re-download it")
        return ref

    def load(self, module, prefix: str, half=None, inspect=None):
        """Give ``module`` (named ``prefix`` in the checkpoint) its weights on the device.

        ``half``: round the weights through this 16-bit dtype (what the base GGUF holds);
        ``inspect(ref, weight)``: called on each weight as read, before that rounding."""
        torch = self.torch
        if prefix in self._resident:
            return module
        with weights_mapped():
            module.to_empty(device=self.placement.get(prefix, self.device))
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(self._buffers[f"{prefix}.{name}"])
            for name, p in module.named_parameters():
                ref = self.ref(f"{prefix}.{name}")
                step = max(1, ROW_BLOCK // max(1, p.numel() // ref.shape[0]))
                for i, a in _row_blocks(torch, ref, step):  # in row blocks: no whole copies
                    p[i:i + step].copy_(a)
                if inspect is not None:
                    inspect(ref, p)
                if half is not None and p.dim() == 2 and _torch_dtypes().get(ref.dtype) != half:
                    for i in range(0, p.shape[0], step):  # (a 16-bit source of that type: as is)
                        p[i:i + step].copy_(p[i:i + step].to(half))
        if prefix in self.placement:
            self._resident.add(prefix)
        return module

    def pin(self, module) -> None:
        """Keep a loaded ``module`` until :meth:`release` (unload leaves it)."""
        self._resident.add(self._prefix[id(module)])

    def release(self, module) -> None:
        """Unload ``module`` even when pinned."""
        self._resident.discard(self._prefix[id(module)])
        module.to("meta")

    def read_rows(self, name: str, keep: np.ndarray, half=None):
        """Rows ``keep`` (sorted) of weight ``name``, rounded through ``half``, on the device;
        read in row blocks, so a vocabulary-sized tensor is never whole in memory."""
        torch = self.torch
        ref = self.ref(name)
        step = max(1, ROW_BLOCK // max(1, int(np.prod(ref.shape[1:]))))
        parts = []
        for i, a in _row_blocks(torch, ref, step):
            sel = keep[(keep >= i) & (keep < i + len(a))]
            if len(sel):
                parts.append(a[torch.from_numpy(sel - i)].float())  # (indexing: a copy)
        w = torch.cat(parts)
        return (w.to(half).float() if half is not None else w).to(self.device)

    def unload(self, module) -> None:
        if self._prefix.get(id(module)) not in self._resident:
            module.to("meta")

    def device_of(self, module):
        return next(module.parameters()).device

    def position(self, h):
        """({mask kind: mask}, {layer keyword: rotary (cos, sin)}, position ids) for a [1, T, H]
        window, made once per window length and device by transformers' own functions."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        key = (h.shape[1], str(h.device))
        if key not in self._positions:
            torch = self.torch
            pos = torch.arange(h.shape[1], device=h.device)
            make = {"full_attention": create_causal_mask,
                    "sliding_attention": create_sliding_window_causal_mask}
            with torch.no_grad():
                masks = {kind: make[kind](config=self.lm.config, input_embeds=h, attention_mask=None,
                                          cache_position=pos, past_key_values=None,
                                          position_ids=pos.unsqueeze(0))
                         for kind in set(self.mask_kinds)}
                rope = {kw: tuple(r.to(h.device) for r in m(h, pos.unsqueeze(0).to(self.device)))
                        for kw, m in self.rope.items()}  # computed on the main device
            self._positions[key] = (masks, rope, pos.unsqueeze(0))
        return self._positions[key]

    def run_layer(self, layer, h):
        h = h.to(self.device_of(layer))
        masks, rope, pos = self.position(h)
        out = layer(h, attention_mask=masks[self.mask_kinds[self._index[id(layer)]]],
                    position_ids=pos, use_cache=False, **rope)
        return out[0] if isinstance(out, (tuple, list)) else out

    def embed(self, windows: list[list[int]], half=None, inspect=None) -> list:
        """The embedding of every window ([1, T, H] each); the embedding is unloaded after."""
        torch = self.torch
        emb = self.load(self.lm.model.embed_tokens, "model.embed_tokens", half, inspect)
        with torch.no_grad():
            hs = [emb(torch.tensor([w], device=self.device_of(emb))) for w in windows]
            if self.arch.embed_scale:  # as the model's forward does, in the hidden states' dtype
                hs = [h * torch.tensor(self.lm.config.hidden_size ** 0.5, dtype=h.dtype) for h in hs]
        self.unload(emb)
        return hs
