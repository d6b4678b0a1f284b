"""One streamed pass: LIM, ZD, the importance matrix and the Fisher diagonal, a layer at a time.

What it computes (per calibration window of ``seq_len`` tokens, labels ``y`` sampled from the
model itself): the gradient ``g`` of ``sum_t -log p(y_t)`` with respect to every matmul weight,
accumulated as ``F = sum_windows g^2 / tokens`` (the diagonal Fisher information per token); as
llama-imatrix does, the per-column sum of squared inputs of every matmul (the imatrix); and the
paper's layer scores, LIM from each layer's input and output and ZD from its weights as read.

How (bounded memory, :class:`lwq_gguf.model.stream.LayerStream`): a forward pass layer by layer
keeps each layer's input activations (tokens x hidden per layer, on the host); the head (final
norm + output) samples the labels and starts the backward; then the layers are taken from last
to first, each recomputes its forward from its saved input and back-propagates the gradient it
receives, window by window. The last layers of the forward stay loaded for the backward while
they fit in ``KEEP_BYTES``; the others are read again. The weights are rounded through the
16-bit type the base GGUF holds, so the Fisher is taken where the quantizer starts.

Only the sampled rows' Fisher is formed (:mod:`lwq_gguf.score.sample`): the weights themselves
need no gradient, so autograd computes the activations' gradients alone, and a hook on each
matmul forms ``g[:, rows]^T x`` for its sampled rows - a fraction of a full weight gradient.
Where the rows are drawn by their damage, each matmul's inputs and output gradients are held
until the layer's last window, every row's Fisher mass is sketched from them (``|x^T g_i|^2``
through ``SKETCH`` random projections of the inputs, a few % of a weight gradient's work), the
rows are drawn, and their gradients formed.
A tied embedding gets both gradients per window (as input lookup and as output projection)
before squaring: the output part is kept for the window's own token rows only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lwq_gguf.model.arch import gguf_names, merge_experts, n_experts
from lwq_gguf.model.heap import give_back
from lwq_gguf.model.load import HFModel
from lwq_gguf.quant.imatrix import Imatrix
from lwq_gguf.score.clock import Phases
from lwq_gguf.score.floor import ACT_BLOCKS, floor_hook, per_token
from lwq_gguf.score.head import Head, HeadJob, embedding_fisher, head_backward
from lwq_gguf.score.layers import (ZDInspector, autocast, calibration_ids, matmul_precision,
                                   torch_device)
from lwq_gguf.score.sample import (EVERY_ROW, FisherTensor, RowSample, drawn_rows, fisher_windows,
                                   kept_rows)
from lwq_gguf.score.scores import ScoreConfig, sig6

if TYPE_CHECKING:
    from lwq_gguf.model.stream import LayerStream

KEEP_BYTES = 2 << 30  # float32 layer weights kept loaded from the forward for the backward
SKETCH = 64  # random projections a row's Fisher mass is estimated through (rows drawn by damage)
__all__ = ["FisherRun", "FisherTensor", "kept_rows", "streamed_fisher"]


@dataclass
class FisherRun:
    """What the forward pass left: the imatrix, LIM and ZD (complete) and the per-tensor stream
    the backward pass yields."""

    imatrix: Imatrix
    tokens: int
    fisher_tokens: int  # of which the Fisher is taken over
    lim: tuple[float, ...]
    zd: tuple[float, ...]
    device: str
    precision: str  # the matmuls' (bf16 | fp32: score.layers.matmul_precision)
    tensors: Iterator[FisherTensor]


def streamed_fisher(model: HFModel, cfg: ScoreConfig, progress: bool = True,
                    sample: RowSample = EVERY_ROW, phases: Phases | None = None,
                    on_tokens=None) -> FisherRun:
    """Run the forward pass now; the returned iterator runs the backward, layer by layer.

    ``on_tokens(n)``: called as token-layers are done (n tokens through one layer: forward 1,
    backward 2 per token), for one progress bar over the whole run."""
    import torch

    from lwq_gguf.model.stream import LayerStream

    phases = phases if phases is not None else Phases()
    tick = on_tokens or (lambda n: None)
    device = torch_device(cfg.device)
    precision = matmul_precision(cfg.precision, device)

    def amp():
        return autocast(torch, device, precision)

    with phases("setup"):  # the tokenizer, the calibration tokens, the model's skeleton
        ids = calibration_ids(model, cfg)
        s = LayerStream(model, device, cfg.seq_len, cfg.device_map)
    lm = s.lm
    names = gguf_names(lm, s.arch, model.n_layers)
    experts = n_experts(names)
    half = torch.bfloat16 if any(t.dtype == "BF16" for t in model.tensors) else torch.float16
    windows = [w for w in (ids[i: i + cfg.seq_len] for i in range(0, len(ids), cfg.seq_len))
               if len(w) > 1]
    n_tok = sum(len(w) for w in windows)
    chosen = fisher_windows(len(windows), cfg.fisher_tokens, cfg.seq_len)
    sums: dict[str, torch.Tensor] = {}  # [experts, cols]: each expert sees the tokens routed to it
    counts: dict[str, np.ndarray] = {}
    last: list = [None, None]  # q, k and v (gate and up) see the same input: squared once

    def accumulate(gname, expert, x):
        t0 = time.perf_counter()
        if x is not last[0]:  # float32 squares summed per window (as llama-imatrix), then float64
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            last[:] = [x, ((flat * flat).sum(0).double(), flat.shape[0])]
        sq, n = last[1]
        if gname not in sums:
            sums[gname] = torch.zeros(experts[gname], len(sq), dtype=torch.float64,
                                      device=sq.device)
            counts[gname] = np.zeros(experts[gname], dtype=np.int64)
        sums[gname][expert or 0] += sq
        counts[gname][expert or 0] += n
        phases.inner("imatrix", time.perf_counter() - t0)

    def hook_for(gname, expert):
        return lambda _mod, args: accumulate(gname, expert, args[0])

    handles = [mod.register_forward_pre_hook(hook_for(*names[n + ".weight"]))
               for n, mod in lm.named_modules()
               if isinstance(mod, torch.nn.Linear) and n + ".weight" in names]
    if s.tied:  # the output is the token embedding: its inputs count for token_embd
        experts["token_embd.weight"] = 1
        handles.append(lm.lm_head.register_forward_pre_hook(hook_for("token_embd.weight", None)))
    zd = ZDInspector(model.n_layers)

    def inspect(ref, w):
        with phases("zd"):
            zd(ref, w)

    lim = [0.0] * model.n_layers
    inputs: list[list[torch.Tensor]] = []
    pinned, room = set(), KEEP_BYTES if not s.placement else 0
    for i in reversed(range(model.n_layers)):  # the backward starts from the last layers
        size = 4 * sum(p.numel() for p in s.layers[i].parameters())
        if size > room:
            break
        pinned.add(i)
        room -= size
    try:
        with torch.no_grad():
            with phases("read"):
                hs = s.embed(windows, half, inspect)
            for i, layer in enumerate(s.layers):
                with phases("read"):
                    s.load(layer, f"model.layers.{i}", half, inspect)
                inputs.append([hs[j].cpu() for j in chosen])
                with phases("forward"), amp():
                    out = [s.run_layer(layer, h) for h in hs]
                    lim[i] = sum(float(torch.nn.functional.cosine_similarity(
                        h.to(o.device).float(), o.float(), dim=-1).double().sum())
                        for h, o in zip(hs, out))
                hs = out
                tick(n_tok)
                s.pin(layer) if i in pinned else s.unload(layer)
        head_name = names["lm_head.weight"][0] if not s.tied else "token_embd.weight"
        give_back()  # (model.heap: the forward's temporaries, before the head's logits)
        with phases("head"):
            head = head_backward(s, hs, HeadJob(windows, chosen, half, sample,
                                                lambda x: accumulate(head_name, None, x), amp))
    finally:
        for h in handles:
            h.remove()
    im = Imatrix({k: v.cpu().numpy().reshape(-1) for k, v in sums.items()}, counts,
                 cfg.calib_file.name, cfg.seq_len, len(windows))
    fisher_tok = sum(len(windows[j]) for j in chosen)
    run = Pass(s, [windows[j] for j in chosen], half, names, fisher_tok, sample, phases, tick,
               frozenset(pinned), amp, im)
    return FisherRun(im, n_tok, fisher_tok, tuple(sig6(-(x / n_tok)) for x in lim), zd.scores(),
                     device, precision, _backward(run, inputs, head))


@dataclass(frozen=True)
class Pass:
    """What the backward pass shares: the stream, the windows, the 16-bit type, the GGUF names,
    the token count, the row sample, the clock and the progress callback."""

    s: LayerStream
    windows: list
    half: Any  # torch dtype
    names: dict
    n_tok: int
    sample: RowSample
    phases: Phases
    tick: Callable[[int], None]
    pinned: frozenset  # layers kept loaded from the forward
    amp: Callable[[], Any]  # the matmuls' precision context (score.layers.autocast)
    imatrix: Imatrix  # (complete: the forward pass is over)


def _rows_kept(n: int, cols: int, expert: int | None, n_exp: int, sample: RowSample):
    """The rows of an n-row weight whose Fisher is kept: the sample's rows of the weight, or for
    expert e of a merged tensor, its part of the merged tensor's sample (local indices)."""
    if expert is None:
        return sample.rows(n, cols)
    keep = sample.rows(n * n_exp, cols)
    return keep[(keep >= expert * n) & (keep < (expert + 1) * n)] - expert * n


def _layer_fisher(run: Pass, layer, i: int, inputs: list, grads: list) -> dict:
    """Back-propagate every window through decoder layer ``i`` (its input gradients replace
    ``grads``); {HF weight name: (sampled rows, what each counts for (None: rows / sampled),
    their sum of per-window g^2, the weight, its row count, its runtime floor)}."""
    s, names, sample = run.s, run.names, run.sample
    torch = s.torch
    experts = n_experts(names)
    dev = s.device_of(layer)
    for p in layer.parameters():
        p.requires_grad_(False)  # the weights' gradients: by hand, sampled rows only
    lin = {f"model.layers.{i}.{n}.weight": m for n, m in layer.named_modules()
           if isinstance(m, torch.nn.Linear) and f"model.layers.{i}.{n}.weight" in names}
    total = {n: m.out_features * experts[names[n][0]] for n, m in lin.items()}  # (merged)
    drawn = {n for n, m in lin.items()
             if sample.by_damage and sample.count(total[n], m.in_features) < total[n]}
    rows = {n: _rows_kept(m.out_features, m.in_features, names[n][1], experts[names[n][0]], sample)
            for n, m in lin.items() if n not in drawn}
    fisher = {n: torch.zeros(len(r), lin[n].in_features, device=dev) for n, r in rows.items()}
    held: dict[str, list] = {n: [] for n in drawn}  # per window: (input, output gradient)
    cur: dict[str, Any] = {}  # this window's gradient of each weight's sampled rows

    def hook_for(n):
        r = torch.from_numpy(rows[n]).to(dev) if n in rows else None
        every = r is not None and len(r) == lin[n].out_features

        def hook(_mod, args, out):
            if not out.requires_grad or (r is not None and not len(r)):
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])

            def on_grad(g):
                g = g.reshape(-1, g.shape[-1])
                if r is None:
                    held[n].append((x, g.detach()))
                    return
                gw = (g if every else g[:, r]).float().T @ x.float()
                cur[n] = gw if n not in cur else cur[n] + gw
            out.register_hook(on_grad)
        return hook

    floor = {n: dict.fromkeys(ACT_BLOCKS, 0.0) for n in lin}
    handles = [m.register_forward_hook(hook_for(n)) for n, m in lin.items()]
    shared: dict = {}  # the inputs' rounding errors in this window (floor_hook)
    handles += [m.register_forward_pre_hook(floor_hook(floor[n], shared)) for n, m in lin.items()]
    try:
        for j, g in enumerate(grads):
            x = inputs[j].to(dev).requires_grad_(True)
            with run.amp():
                out = s.run_layer(layer, x)
            out.backward(g.to(dev, out.dtype))
            shared.clear()
            for n, gw in cur.items():
                fisher[n].addcmul_(gw, gw)
            cur.clear()
            grads[j] = x.grad.cpu()
            run.tick(2 * inputs[j].shape[1])
    finally:
        for h in handles:
            h.remove()
    counts: dict[str, Any] = dict.fromkeys(lin)
    sketched: dict = {}  # (an input several matmuls share - q, k, v; gate, up - projected once)
    for gname in sorted({names[n][0] for n in drawn}):  # (a merged tensor's experts together)
        parts = sorted((names[n][1] or 0, n) for n in drawn if names[n][0] == gname)
        im = run.imatrix.weights(gname)  # (every expert's row, made once)
        proxy = np.concatenate([_row_proxy(run, lin[n], held[n], im, e, sketched)
                                for e, n in parts])
        m = lin[parts[0][1]]
        keep, weight = drawn_rows(proxy, sample.count(total[parts[0][1]], m.in_features), gname)
        for e, n in parts:
            mine = (keep >= e * m.out_features) & (keep < (e + 1) * m.out_features)
            rows[n], counts[n] = keep[mine] - e * m.out_features, weight[mine]
            r = torch.from_numpy(rows[n]).to(dev)
            fisher[n] = torch.zeros(len(r), m.in_features, device=dev)
            for x, g in held[n]:
                gw = g[:, r].float().T @ x.float()
                fisher[n].addcmul_(gw, gw)
            held[n] = []
    sketched.clear()
    return {n: (rows[n], counts[n], fisher[n], m.weight.detach(), m.out_features, floor[n])
            for n, m in lin.items()}


def _row_proxy(run: Pass, m, held: list, im: np.ndarray | None, expert: int,
               sketched: dict) -> np.ndarray:
    """Every row's damage estimate (score.sample): its Fisher mass sum_j F_ij, sketched as
    sum over windows of |S x^T g_i|^2 (S: SKETCH x cols, N(0, 1/SKETCH), fixed; in the pass's
    matmul precision), times sum_b max_{j in b} w_ij^2 sum_{j in b} a_j over the row's 32-weight
    blocks (a: ``expert``'s row of the imatrix ``im``)."""
    torch = run.s.torch
    w = m.weight.detach().float()
    cols = w.shape[1]
    mass = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    for x, g in held:
        if id(x) not in sketched:  # (x kept beside its projection: its id stays its own)
            s = torch.randn(cols, SKETCH, generator=torch.Generator().manual_seed(cols))
            with run.amp():
                sketched[id(x)] = (x, x @ s.div_(SKETCH ** 0.5).to(x.device, x.dtype))
        with run.amp():
            z = (g.T @ sketched[id(x)][1]).float()
        mass += (z * z).sum(1).double()
    a = (torch.from_numpy(im.reshape(-1, cols)[expert]).to(w.device) if im is not None
         else torch.ones(cols, device=w.device))
    if cols % 32:
        err = (w * w) @ a
    else:
        err = w.abs().reshape(w.shape[0], -1, 32).amax(-1).square() @ a.reshape(-1, 32).sum(-1)
    return (mass * err.double()).cpu().numpy()


def _backward(run: Pass, inputs, head: Head) -> Iterator[FisherTensor]:
    s, names, n_tok, phases = run.s, run.names, run.n_tok, run.phases
    if not s.tied:
        yield FisherTensor(names["lm_head.weight"][0], head.weight.cpu().numpy(),
                           head.fisher.div_(n_tok).cpu().numpy(), head.n_rows,
                           head.keep.cpu().numpy(), weights=head.weights,
                           floor=per_token(head.floor, n_tok))
        head.fisher = head.weight = None
    grads = head.grads
    torch = s.torch
    for i in reversed(range(len(inputs))):
        with phases("read"):
            layer = s.load(s.layers[i], f"model.layers.{i}", run.half)
        with phases("backward"):
            got = _layer_fisher(run, layer, i, inputs[i], grads)
        inputs[i] = None
        merged: dict[str, dict[int, tuple]] = {}
        for n, (rows, counts, f, w, n_rows, fl) in got.items():
            (gname, expert), w = names[n], w[torch.from_numpy(rows)].cpu().numpy()
            f = f.div_(n_tok).cpu().numpy()
            fl = per_token(fl, n_tok)
            if expert is None:
                yield FisherTensor(gname, w, f, n_rows, rows, weights=counts, floor=fl)
            else:
                merged.setdefault(gname, {})[expert] = (w, f, rows, n_rows, fl, counts)
        for gname, parts in merged.items():  # the converter's 3-D tensor, rows expert by expert
            n, per = len(parts), parts[0][3]
            drawn = parts[0][5] is not None
            yield FisherTensor(gname, merge_experts({e: p[0] for e, p in parts.items()}),
                               merge_experts({e: p[1] for e, p in parts.items()}), per * n,
                               np.concatenate([parts[e][2] + e * per for e in range(n)]), n,
                               weights=(np.concatenate([parts[e][5] for e in range(n)])
                                        if drawn else None),
                               floor={b: sum(p[4][b] for p in parts.values()) for b in ACT_BLOCKS})
        del got, merged
        s.release(layer) if i in run.pinned else s.unload(layer)
    yield embedding_fisher(run, head, grads)
