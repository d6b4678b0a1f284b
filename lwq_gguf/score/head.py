"""The ends of the streamed pass (:mod:`lwq_gguf.score.fisher`): the head (final norm and
output layer) that samples the labels and starts the backward, with the output weight's Fisher,
and the token embedding's Fisher at the end of the backward.

One pass of logits over the Fisher windows draws their labels, forms d loss / d logits =
softmax - onehot(y) and from it the backward's start (the last layer's output gradient) and a
tied embedding's rows' gradients as output projection (added to their input-lookup gradients
before squaring). The output weight's Fisher is kept on some rows only, made afterwards from
those rows' own logits and each token's log-sum-exp (a matmul of the kept rows, not of the
vocabulary), in blocks of rows.

Which output rows are kept (score.sample): the rows the labels fall on (gradient p - 1 there:
most of a row's Fisher) and, for a tied embedding, the rows of every token the windows hold
(their input gradients) for certain; the rest drawn by their expected gradient energy
sum_t p (1 - p) times their weights' squares against the output's squared inputs
(``a_i sum_j b_j w_ij^2``), each counting for 1 / its probability.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lwq_gguf.score.floor import ACT_BLOCKS, add_act_floor, per_token
from lwq_gguf.score.sample import (FisherTensor, RowSample, drawn_rows, sample_labels,
                                   stratified_rows)

HEAD_BLOCK = 1 << 24  # output-gradient elements formed at a time (64 MiB as float32)


@dataclass
class Head:
    grads: list  # d loss / d h (last layer's output), per window, on the host
    fisher: Any  # output weight's sum of g^2 on the kept rows (tied: kept for the embedding)
    weight: Any  # the output weight's kept rows
    keep: Any  # the kept rows (a sorted index tensor)
    n_rows: int  # the output's row count
    rows: list  # tied: per window (token rows, the output gradient on those rows)
    proxy: np.ndarray | None  # every output row's damage proxy, a_i sum_j b_j w_ij^2 (uniform)
    present: np.ndarray  # the tokens of the Fisher windows (sorted)
    floor: dict[int, float]  # the output matmul's runtime floor, summed over the Fisher tokens
    weights: np.ndarray | None = None  # drawn rows: what each kept row counts for (1 / pi)


@dataclass(frozen=True)
class HeadJob:
    windows: list
    chosen: list  # the Fisher windows
    half: Any  # torch dtype
    sample: RowSample
    imatrix: Callable[[Any], None]  # x -> None: adds the output's inputs to the imatrix
    amp: Callable[[], Any]  # the matmuls' precision context (score.layers.autocast)


def head_backward(s, hs, job: HeadJob) -> Head:
    """Final norm + output: sample labels, start the backward; the output weight's Fisher.

    One pass of logits over the Fisher windows (``chosen``) samples their labels, forms the
    output's input gradient (the backward's start) and each row's gradient energy; the others
    only add the output's inputs to the imatrix (``imatrix(x)``). The kept rows, chosen from that
    energy, get their gradients afterwards from their own logits and each token's log-sum-exp,
    so no vocabulary x tokens probability is formed twice, and no vocabulary x hidden gradient
    is ever whole in memory (an 8B model's output is 2 GB in float32)."""
    torch = s.torch
    windows, chosen, sample, imatrix = job.windows, job.chosen, job.sample, job.imatrix
    norm = s.load(s.lm.model.norm, "model.norm")
    head = s.load(s.lm.lm_head, "lm_head", job.half)
    w = head.weight
    dev = w.device
    present = np.array(sorted({t for j in chosen for t in windows[j]}), dtype=np.int64)
    count = sample.count(w.shape[0], w.shape[1], vocab=True)
    drawn = sample.by_damage and count < w.shape[0]
    # each row's gradient energy over the Fisher windows (drawn: in expectation over the labels,
    # p (1 - p); a uniform sample: as drawn) and the output's squared inputs
    energy = torch.zeros(w.shape[0], device=dev)
    inputs_sq = torch.zeros(w.shape[1], device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    ends: list[_Window] = []  # per Fisher window: what its kept rows' gradients are made from
    grads, rows = [], []
    floor = dict.fromkeys(ACT_BLOCKS, 0.0)
    for j, (h, win) in enumerate(zip(hs, windows)):
        if j not in chosen:
            with torch.no_grad():
                imatrix(norm(h.to(dev))[0])
            continue
        h = h.detach().to(dev).requires_grad_(True)
        hn = norm(h)[0]
        with torch.no_grad(), job.amp():
            x = hn.detach()
            imatrix(x)
            d, slope, lse = _probabilities(torch.nn.functional.linear(x, w, head.bias),
                                           s.softcap)
            if drawn:
                energy += _expected_energy(d, slope)
            y = sample_labels(d, gen)
            d[torch.arange(len(y), device=dev), y] -= 1  # d sum(-log p(y)) / d logits
            if slope is not None:
                d.mul_(slope)  # ... / d z
                del slope
            if not drawn:
                energy += (d * d).sum(0)
            inputs_sq += x.float().square().sum(0)
            if s.tied:
                tok = torch.tensor(sorted(set(win)), device=dev)
                rows.append((tok.to(s.device), (d[:, tok].T @ x).float().to(s.device)))
            dx = (d @ w).float()
            del d
            add_act_floor(floor, x, dx)
            ends.append(_Window(x, lse, y))
        hn.backward(dx)
        norm.weight.grad = None
        grads.append(h.grad.cpu())
    weights = None
    if drawn:  # the labels' rows (and a tied embedding's window tokens) for certain, then a draw
        certain = torch.cat([e.labels for e in ends]).unique().cpu().numpy()
        if s.tied:
            certain = np.union1d(certain, present)
        k, weights = _draw(_row_energy(w, inputs_sq).mul_(energy).double().cpu().numpy(), count,
                           certain, "token_embd.weight" if s.tied else "output.weight")
    else:
        k = (stratified_rows(w.shape[0], present, count) if s.tied
             else sample.rows(w.shape[0], w.shape[1], vocab=True))
    keep = torch.from_numpy(k).to(dev)
    weight = w.detach()[keep]
    bias = None if head.bias is None else head.bias.detach()[keep]
    with torch.no_grad(), job.amp():
        fisher = _kept_fisher(weight, bias, keep, ends, s.softcap)
    proxy = None if drawn else (energy * _row_energy(w, inputs_sq)).cpu().double().numpy()
    s.unload(norm)
    s.unload(head)
    return Head(grads, fisher.to(s.device), weight, keep.to(s.device), w.shape[0], rows,
                proxy, present, floor, weights)


@dataclass(frozen=True)
class _Window:
    x: Any  # the output's inputs (tokens x hidden)
    lse: Any  # each token's log-sum-exp of the (capped) logits
    labels: Any  # the sampled labels


def _kept_fisher(weight, bias, keep, ends: list[_Window], cap: float | None):
    """The kept output rows' sum over windows of their gradient squared: each row's logits
    made again from its own weights (``weight``: the kept rows), its probabilities from the
    token's log-sum-exp, minus 1 where the label falls, in blocks of rows."""
    import torch

    fisher = torch.zeros(weight.shape, device=weight.device)
    for e in ends:
        at = torch.searchsorted(keep, e.labels).clamp_(max=len(keep) - 1)
        hit = keep[at] == e.labels  # the tokens whose label is a kept row
        tokens = torch.arange(len(e.labels), device=keep.device)
        block = max(1, HEAD_BLOCK // len(e.labels))
        for i in range(0, len(keep), block):
            z, slope = _capped(torch.nn.functional.linear(
                e.x, weight[i:i + block], None if bias is None else bias[i:i + block]), cap)
            d = z.sub_(e.lse[:, None]).exp_()
            on = hit & (at >= i) & (at < i + block)
            d[tokens[on], at[on] - i] -= 1
            if slope is not None:
                d.mul_(slope)
            g = (d.T @ e.x).float()
            fisher[i:i + block].addcmul_(g, g)
    return fisher


def _capped(z, cap: float | None):
    """The logits ``cap * tanh(z / cap)`` (or z) in float32, and d logits / d z (None without a
    softcap)."""
    import torch

    z = z.float()
    if not cap:
        return z, None
    t = torch.tanh(z / cap)
    return t * cap, t.mul_(t).neg_().add_(1)  # 1 - tanh^2 (t's memory)


def _probabilities(z, cap: float | None):
    """The softmax of the logits ``cap * tanh(z / cap)`` (or of z), d logits / d z (None
    without a softcap) and each token's log-sum-exp of the logits."""
    import torch

    z, slope = _capped(z, cap)
    p = torch.softmax(z, -1)
    top = p.argmax(-1, keepdim=True)  # (log-sum-exp = z - log p anywhere; at the top p exactly
    # enough, and no vocabulary-sized temporary as torch.logsumexp makes)
    return p, slope, (z.gather(-1, top) - p.gather(-1, top).log()).squeeze(-1)


def _expected_energy(p, slope, rows: int = 64):
    """Each output row's gradient energy summed over the window's tokens, in expectation over the
    labels the model itself would draw: E_y (p - onehot(y))^2 = p (1 - p) (times the softcap's
    slope^2). It weighs the draw of the rows no drawn label fell on (those are kept for certain):
    a smooth estimate over every token, where one draw of labels would be all or nothing."""
    out = p.new_zeros(p.shape[1])
    for i in range(0, p.shape[0], rows):
        b = p[i:i + rows]
        e = b * (1 - b)
        if slope is not None:
            e.mul_(slope[i:i + rows].square())
        out += e.sum(0)
    return out


def _row_energy(w, b):
    """sum_j b_j w_ij^2 for every row of ``w`` (in blocks: no vocabulary x hidden temporary)."""
    out = b.new_empty(w.shape[0])
    step = max(1, HEAD_BLOCK // w.shape[1])
    for i in range(0, w.shape[0], step):
        out[i:i + step] = w[i:i + step].detach().float().square() @ b.float()
    return out


def _draw(est: np.ndarray, count: int, certain: np.ndarray, name: str):
    """The output rows kept and what each counts for: ``certain`` (the labels' rows, whose
    gradient is -1 + p where a label falls, and a tied embedding's window tokens) each for
    itself, and a draw from the rest by ``est`` (score.sample.drawn_rows; at least a quarter of
    ``count``)."""
    rest = np.setdiff1d(np.arange(len(est)), certain)
    at, w = drawn_rows(est[rest], max(count - len(certain), count // 4), name)
    keep = np.concatenate([certain, rest[at]])
    order = np.argsort(keep)
    return keep[order], np.concatenate([np.ones(len(certain)), w])[order]


def embedding_fisher(run, head: Head, grads) -> FisherTensor:
    """Fisher of the token embedding's kept rows: sum over windows of its gradient squared
    (+ the output's, when tied); its weight rows are read, not the whole embedding loaded.
    ``run``: the pass's shared state (:class:`lwq_gguf.score.fisher.Pass`)."""
    s, windows, half, names, n_tok = run.s, run.windows, run.half, run.names, run.n_tok
    torch = s.torch
    hf = "model.embed_tokens.weight"
    n_rows, n_cols = s.ref(hf).shape[:2]
    # untied: the Fisher windows' tokens, exactly (every other row's Fisher is zero); tied:
    # those and a sample of the rest, which counts for the rest by the output's proxy
    keep = head.keep if s.tied else torch.from_numpy(head.present).to(s.device)
    k = keep.cpu().numpy()
    weights = np.ones(len(k))
    if s.tied and head.weights is not None:  # (drawn by damage: each counts for 1 / pi)
        weights = head.weights
    elif s.tied and len(k) < n_rows and head.proxy is not None:
        rest = ~np.isin(k, head.present)
        others = np.ones(n_rows, dtype=bool)
        others[head.present] = False
        part = float(head.proxy[k[rest]].sum())
        weights[rest] = (float(head.proxy[others].sum()) / part if part > 0
                         else others.sum() / max(1, rest.sum()))
    with run.phases("read"):
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
    # a lookup rounds nothing: only a tied output's matmul has a floor
    floor = per_token(head.floor, n_tok) if s.tied else None
    return FisherTensor(names[hf][0], w.cpu().numpy(), fisher.div_(n_tok).cpu().numpy(), n_rows,
                        k, weights=weights, floor=floor)
