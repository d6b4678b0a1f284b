"""The Fisher diagonal and the importance matrix, streamed one decoder layer at a time.

What it computes (per calibration window of ``seq_len`` tokens, labels ``y`` sampled from the
model itself): the gradient ``g`` of ``sum_t -log p(y_t)`` with respect to every matmul weight,
accumulated as ``F = sum_windows g^2 / tokens`` (the diagonal Fisher information per token); and,
as llama-imatrix does, the per-column sum of squared inputs of every matmul (the imatrix).

How (bounded memory, :class:`lwq_gguf.stream.LayerStream`): a forward pass layer by layer keeps
each layer's input activations (tokens x hidden per layer, on the host) and collects the imatrix;
the head (final norm + output) samples the labels and starts the backward; then the layers are
reloaded from last to first, each recomputes its forward from its saved input and back-propagates
the gradient it receives, window by window. So one layer's weights, gradients and Fisher are in
memory at a time, plus the activations, whatever the model's size. The weights are rounded
through the 16-bit type the base GGUF holds, so the Fisher is taken where the quantizer starts.

A tied embedding gets both gradients per window (as input lookup and as output projection)
before squaring: the output part is kept for the window's own token rows only, so no
vocabulary-sized per-window tensor is ever stored.

``max_rows``: the sensitivity needs only a fixed sample of each tensor's rows (rows quantize
independently); the Fisher of the output and the embedding is then formed for those rows only,
and the embedding's weight rows are read without loading it, so at 8B scale neither of the two
2 GB (float32) vocabulary tensors is held twice.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from lwq_gguf.model.arch import Arch
from lwq_gguf.model.load import HFModel
from lwq_gguf.quant.imatrix import Imatrix
from lwq_gguf.score.layers import calibration_ids, resolve_device
from lwq_gguf.score.scores import ScoreConfig


HEAD_BLOCK = 1 << 24  # output-gradient elements formed at a time (64 MiB as float32)


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def gguf_names(lm, arch: Arch, n_layers: int) -> dict[str, tuple[str, int | None]]:
    """HF parameter name -> (GGUF tensor name, expert index or None), for the 2-D weights the
    converter writes; an expert's weight maps to the merged ``ffn_*_exps`` tensor of its layer."""
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf], n_layers)
    out = {}
    for name, p in lm.named_parameters(remove_duplicate=True):
        if p.dim() == 2:
            m = _EXPERT.search(name)
            merged = _EXPERT.sub(".experts.", name) if m else name
            g = tmap.get_name(merged, try_suffixes=(".weight",))
            if g:
                out[name] = (g, int(m.group(1)) if m else None)
    return out


def n_experts(names: dict[str, tuple[str, int | None]]) -> dict[str, int]:
    """GGUF name -> how many experts it merges (1: a dense weight)."""
    out: dict[str, int] = {}
    for g, e in names.values():
        out[g] = max(out.get(g, 1), (e or 0) + 1)
    return out


def merge_experts(parts: dict[int, np.ndarray]) -> np.ndarray:
    """Experts' [rows, cols] arrays -> the merged tensor's rows ([experts * rows, cols]), expert 0
    first, as the converter stacks them."""
    return np.concatenate([parts[e] for e in range(len(parts))])


def kept_rows(n: int, max_rows: int | None) -> np.ndarray:
    """The rows of an n-row tensor kept for the sensitivity: all, or a fixed sorted sample."""
    if max_rows is None or n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, max_rows, replace=False))


@dataclass(frozen=True)
class FisherTensor:
    name: str  # GGUF tensor name
    weight: np.ndarray  # the kept rows of the weight, rounded through the 16-bit type (float32)
    fisher: np.ndarray  # their Fisher diagonal per token
    rows: int  # the tensor's row count (weight holds kept_rows(rows, max_rows) of them)
    experts: int = 1  # merged experts: rows [e * rows / experts, (e + 1) * rows / experts) are e's

    def expert_of_kept(self, max_rows: int | None) -> np.ndarray:
        """The expert each kept row belongs to."""
        return kept_rows(self.rows, max_rows) // (self.rows // self.experts)


@dataclass
class FisherRun:
    """What the forward pass left: the imatrix (complete) and the per-tensor stream to come."""

    imatrix: Imatrix
    tokens: int
    tensors: Iterator[FisherTensor]


def streamed_fisher(model: HFModel, cfg: ScoreConfig, progress: bool = True,
                    max_rows: int | None = None) -> FisherRun:
    """Run the forward pass now; the returned iterator runs the backward, layer by layer."""
    import torch

    from lwq_gguf.model.stream import LayerStream

    device = resolve_device(cfg.device)
    ids = calibration_ids(model, cfg)
    s = LayerStream(model, device, cfg.seq_len, cfg.device_map)
    lm = s.lm
    names = gguf_names(lm, s.arch, model.n_layers)
    experts = n_experts(names)
    half = torch.bfloat16 if any(t.dtype == "BF16" for t in model.tensors) else torch.float16
    windows = [w for w in (ids[i: i + cfg.seq_len] for i in range(0, len(ids), cfg.seq_len))
               if len(w) > 1]
    n_tok = sum(len(w) for w in windows)
    sums: dict[str, torch.Tensor] = {}  # [experts, cols]: each expert sees the tokens routed to it
    counts: dict[str, np.ndarray] = {}

    def hook_for(gname, expert):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if gname not in sums:
                sums[gname] = torch.zeros(experts[gname], x.shape[1], dtype=torch.float64,
                                          device=x.device)
                counts[gname] = np.zeros(experts[gname], dtype=np.int64)
            sums[gname][expert or 0] += (x * x).sum(0)
            counts[gname][expert or 0] += x.shape[0]
        return hook

    handles = [mod.register_forward_pre_hook(hook_for(*names[n + ".weight"]))
               for n, mod in lm.named_modules()
               if isinstance(mod, torch.nn.Linear) and n + ".weight" in names]
    if s.tied:  # the output is the token embedding: its inputs count for token_embd
        experts["token_embd.weight"] = 1
        handles.append(lm.lm_head.register_forward_pre_hook(hook_for("token_embd.weight", None)))
    bar = tqdm(total=2 * model.n_layers + 3, desc=f"Fisher + imatrix ({device})", unit="step",
               disable=not progress, leave=False)
    inputs: list[list[torch.Tensor]] = []
    try:
        with torch.no_grad():
            hs = s.embed(windows, half)
            bar.update()
            for i, layer in enumerate(s.layers):
                s.load(layer, f"model.layers.{i}", half)
                inputs.append([h.cpu() for h in hs])
                hs = [s.run_layer(layer, h) for h in hs]
                s.unload(layer)
                bar.update()
        head = _head_backward(s, hs, windows, half, max_rows)
        bar.update()
    finally:
        for h in handles:
            h.remove()
    im = Imatrix({k: v.cpu().numpy().reshape(-1) for k, v in sums.items()}, counts,
                 cfg.calib_file.name, cfg.seq_len, len(windows))
    run = _Pass(s, windows, half, names, n_tok, max_rows)
    return FisherRun(im, n_tok, _backward(run, inputs, head, bar))


def _rows_kept(n: int, expert: int | None, n_exp: int, max_rows: int | None, dev):
    """The rows of an n-row weight whose Fisher is kept: kept_rows of the weight, or for expert e
    of a merged tensor, its part of the merged tensor's kept rows (local indices)."""
    import torch

    if expert is None:
        return torch.from_numpy(kept_rows(n, max_rows)).to(dev)
    keep = kept_rows(n * n_exp, max_rows)
    mine = keep[(keep >= expert * n) & (keep < (expert + 1) * n)] - expert * n
    return torch.from_numpy(mine).to(dev)


@dataclass(frozen=True)
class _Pass:
    """What the backward pass shares: the stream, the windows, the 16-bit type, the GGUF names,
    the token count and the row sample size."""

    s: object  # LayerStream
    windows: list
    half: object  # torch dtype
    names: dict
    n_tok: int
    max_rows: int | None


@dataclass
class _Head:
    grads: list  # d loss / d h (last layer's output), per window, on the host
    fisher: object  # output weight's sum of g^2 on the kept rows (tied: kept for the embedding)
    weight: object  # the output weight's kept rows
    keep: object  # the kept rows (a sorted index tensor)
    n_rows: int  # the output's row count
    rows: list  # tied: per window (token rows, the output gradient on those rows)


def _head_backward(s, hs, windows, half, max_rows) -> _Head:
    """Final norm + output: sample labels, start the backward; the output weight's Fisher.

    The output's gradient is formed by hand (d loss / d logits = softmax - onehot(y)) on the
    kept rows only, in blocks of rows, so no vocabulary x hidden gradient is ever whole in
    memory (an 8B model's output is 2 GB in float32)."""
    torch = s.torch
    norm = s.load(s.lm.model.norm, "model.norm")
    head = s.load(s.lm.lm_head, "lm_head", half)
    w = head.weight
    dev = w.device
    keep = torch.from_numpy(kept_rows(w.shape[0], max_rows)).to(dev)
    fisher = torch.zeros(len(keep), w.shape[1], device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    grads, rows = [], []
    block = max(1, HEAD_BLOCK // w.shape[1])
    for h, win in zip(hs, windows):
        h = h.detach().to(dev).requires_grad_(True)
        hn = norm(h)[0]
        with torch.no_grad():
            x = hn.detach()
            z = head(x).float()  # (through the module: its imatrix hook)
            cap = s.softcap  # the model's logits are cap * tanh(z / cap)
            t = torch.tanh(z / cap) if cap else None
            d = torch.softmax(t * cap if cap else z, -1)
            del z
            y = torch.multinomial(d, 1, generator=gen)[:, 0]
            d[torch.arange(len(y), device=dev), y] -= 1  # d sum(-log p(y)) / d logits
            if cap:
                d.mul_(1 - t * t)  # ... / d z
                del t
            for i in range(0, len(keep), block):
                g = d[:, keep[i:i + block]].T @ x
                fisher[i:i + block].addcmul_(g, g)
            if s.tied:
                tok = torch.tensor(sorted(set(win)), device=dev)
                rows.append((tok.to(s.device), (d[:, tok].T @ x).to(s.device)))
            dx = d @ w
            del d
        hn.backward(dx)
        norm.weight.grad = None
        grads.append(h.grad.cpu())
    weight = w.detach()[keep]
    s.unload(norm)
    s.unload(head)
    return _Head(grads, fisher.to(s.device), weight, keep.to(s.device), w.shape[0], rows)


def _backward(run: _Pass, inputs, head: _Head, bar) -> Iterator[FisherTensor]:
    s, half, names, n_tok, max_rows = run.s, run.half, run.names, run.n_tok, run.max_rows
    torch = s.torch

    if not s.tied:
        yield FisherTensor(names["lm_head.weight"][0], head.weight.cpu().numpy(),
                           head.fisher.div_(n_tok).cpu().numpy(), head.n_rows)
        head.fisher = head.weight = None
    grads = head.grads
    experts = n_experts(names)
    for i in reversed(range(len(inputs))):
        layer = s.load(s.layers[i], f"model.layers.{i}", half)
        params = {f"model.layers.{i}.{n}": p for n, p in layer.named_parameters()}
        dev = s.device_of(layer)
        rows = {n: _rows_kept(p.shape[0], names[n][1], experts[names[n][0]], max_rows, dev)
                for n, p in params.items() if n in names}
        # the Fisher of the kept rows only: a layer's weights and gradients, not a third copy
        fisher = {n: torch.zeros(len(r), params[n].shape[1], device=dev) for n, r in rows.items()}
        for j, g in enumerate(grads):
            x = inputs[i][j].to(dev).requires_grad_(True)
            s.run_layer(layer, x).backward(g.to(dev))
            for n, f in fisher.items():
                if params[n].grad is not None:  # an expert no token was routed to has none
                    gk = params[n].grad[rows[n]]
                    f.addcmul_(gk, gk)
            layer.zero_grad(set_to_none=True)
            grads[j] = x.grad.cpu()
        inputs[i] = None
        merged: dict[str, dict[int, tuple]] = {}
        for n, f in fisher.items():
            (gname, expert), w = names[n], params[n].detach()[rows[n]].cpu().numpy()
            if expert is None:
                yield FisherTensor(gname, w, f.div_(n_tok).cpu().numpy(), params[n].shape[0])
            else:
                merged.setdefault(gname, {})[expert] = (w, f.div_(n_tok).cpu().numpy(),
                                                        params[n].shape[0])
        for gname, parts in merged.items():  # the converter's 3-D tensor, rows expert by expert
            yield FisherTensor(gname, merge_experts({e: p[0] for e, p in parts.items()}),
                               merge_experts({e: p[1] for e, p in parts.items()}),
                               sum(p[2] for p in parts.values()), len(parts))
        del fisher, params, merged
        s.unload(layer)
        bar.update()
    yield _embedding(run, head, grads)
    bar.update()
    bar.close()


def _embedding(run: _Pass, head: _Head, grads) -> FisherTensor:
    """Fisher of the token embedding's kept rows: sum over windows of its gradient squared
    (+ the output's, when tied); its weight rows are read, not the whole embedding loaded."""
    s, windows, half, names, n_tok = run.s, run.windows, run.half, run.names, run.n_tok
    max_rows = run.max_rows
    torch = s.torch
    hf = "model.embed_tokens.weight"
    n_rows = s._ref(hf).shape[0]
    keep = head.keep if s.tied else torch.from_numpy(kept_rows(n_rows, max_rows)).to(s.device)
    w = s.read_rows(hf, keep.cpu().numpy(), half)
    fisher = head.fisher if s.tied else torch.zeros_like(w)
    for j, (g, win) in enumerate(zip(grads, windows)):
        tok = torch.tensor(win, device=s.device)
        rows = torch.unique(tok)  # sorted, as the tied output rows were kept
        ge = torch.zeros(len(rows), w.shape[1], device=s.device)
        ge.index_add_(0, torch.searchsorted(rows, tok), g[0].to(s.device))
        if s.embed_scale != 1.0:  # the rows were scaled on the way in
            ge.mul_(s.embed_scale)
        if s.tied:  # (g_out + g_in)^2 = g_out^2 (already in) + 2 g_out g_in + g_in^2
            add = 2 * head.rows[j][1] * ge + ge * ge
        else:
            add = ge * ge
        at = torch.searchsorted(keep, rows).clamp(max=len(keep) - 1)
        hit = keep[at] == rows  # the window's tokens among the kept rows
        fisher[at[hit]] += add[hit]
    return FisherTensor(names[hf][0], w.cpu().numpy(), fisher.div_(n_tok).cpu().numpy(), n_rows)
