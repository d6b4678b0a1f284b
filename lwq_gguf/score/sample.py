"""What the sensitivity analysis samples: the rows of each tensor it measures (and what it
measures there), the calibration windows the Fisher is taken over and the labels it is taken
with.

Rows quantize independently (every ggml type encodes a row block by block), so the damage of a
type on a tensor is a sum over rows, estimated from a sample of rows, each sampled row counted
for the rows it stands for. The sample is sized in weights (:class:`RowSample`): about
``weights`` per tensor, at least ``min_rows`` rows; a vocabulary-sized output keeps
``vocab_rows`` rows (a token embedding is sampled by :func:`stratified_rows`).

A layer tensor's rows are drawn with probability proportional to an estimate of their damage
(:func:`drawn_rows`, ``by_damage``), each counting for 1 / its probability (an unbiased sum):
a row's Fisher mass (its gradients over the Fisher windows, sketched: score.fisher) times its
importance-weighted squared block maxima (the scale of any type's rounding error there); the
output's by their labels and expected gradient energy (score.head). A tensor's damage sits in a
few rows: against every row measured on the same tokens, a uniform sample of 65,536 weights put
the demo model's plans 0.3-3.6 % off at 2.5-5.5 BPW, the drawn sample of half as many 0.0-0.3 %
(bench/fidelity.py --against all-rows --uniform; docs/results.md, *Which rows*). Only the
sampled rows' Fisher is ever formed, so the backward pass computes their weight gradients alone.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class RowSample:
    weights: int | None = 1 << 15  # about this many weights per tensor; None: every row
    min_rows: int = 32
    vocab_rows: int | None = 1024  # rows of the output / token embedding (None: every row)
    max_rows: int | None = None  # a cap on every tensor (tests)
    # a layer tensor's rows drawn by their estimated damage (drawn_rows), once the backward has
    # their gradients; False: the fixed uniform sample of ``rows`` (chosen before the pass)
    by_damage: bool = True

    def count(self, n_rows: int, n_cols: int, vocab: bool = False) -> int:
        """How many of a tensor's rows are sampled."""
        if vocab:
            k = self.vocab_rows if self.vocab_rows is not None else n_rows
        elif self.weights is None:
            k = n_rows
        else:
            k = max(self.min_rows, -(-self.weights // max(1, n_cols)))
        if self.max_rows is not None:
            k = min(k, self.max_rows)
        return min(k, n_rows)

    def rows(self, n_rows: int, n_cols: int, vocab: bool = False) -> np.ndarray:
        """A fixed uniform sample of the rows (sorted; all rows when the sample would hold them
        all)."""
        return kept_rows(n_rows, self.count(n_rows, n_cols, vocab))


EVERY_ROW = RowSample(weights=None, vocab_rows=None)
# the fixed uniform sample the weight-error path measures (and the Fisher path's before the rows
# were drawn by damage: bench/fidelity.py --uniform)
UNIFORM = RowSample(weights=1 << 16, min_rows=64, vocab_rows=2048, by_damage=False)


def drawn_rows(proxy: np.ndarray, k: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """k rows drawn with probability pi_i proportional to ``proxy`` (an estimate of each row's
    damage; pi capped at 1, the rest shared again), and what each counts for, 1 / pi_i: the sum
    over the drawn rows of damage / pi is an unbiased estimate of the tensor's whole damage, and
    exact where damage is proportional to the proxy. Systematic sampling in a random order of the
    rows (seeded by ``name``): exactly k rows, sorted. A row of proxy 0 (no gradient, or all-zero
    weights) has no damage under any type, and is never drawn."""
    n = len(proxy)
    p = np.nan_to_num(np.asarray(proxy, dtype=np.float64), nan=0.0, posinf=0.0).clip(min=0.0)
    if k >= np.count_nonzero(p) or p.sum() <= 0:  # (every row that can carry damage)
        keep = np.flatnonzero(p) if p.sum() > 0 else kept_rows(n, k)
        return keep, np.full(len(keep), 1.0 if p.sum() > 0 else n / max(1, len(keep)))
    pi = np.zeros(n)
    certain = np.zeros(n, dtype=bool)
    while True:  # rows whose share would pass 1 are taken for certain, the rest share k - those
        rest = ~certain
        pi[rest] = (k - certain.sum()) * p[rest] / p[rest].sum()
        over = rest & (pi >= 1.0)
        if not over.any():
            break
        certain |= over
    pi[certain] = 1.0
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    order = rng.permutation(n)
    edges = np.cumsum(pi[order])
    hit = np.searchsorted(edges, rng.random() + np.arange(k), side="right")
    keep = np.unique(order[hit[hit < n]])
    return keep, 1.0 / pi[keep]


def kept_rows(n: int, k: int | None) -> np.ndarray:
    """A fixed sorted sample of k of n rows (all when k is None or >= n)."""
    if k is None or n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, k, replace=False))


@dataclass(frozen=True)
class FisherTensor:
    """One GGUF tensor's sampled rows: weights (rounded through the base GGUF's 16-bit type,
    float32) and their Fisher diagonal per token."""

    name: str  # GGUF tensor name
    weight: np.ndarray  # the sampled rows of the weight
    fisher: np.ndarray  # their Fisher diagonal per token
    rows: int  # the tensor's row count
    keep: np.ndarray  # which rows (sorted indices into the tensor's rows)
    experts: int = 1  # merged experts: rows [e * rows / experts, (e + 1) * rows / experts) are e's
    # what each kept row's damage counts for in the tensor's (None: rows / kept, every row)
    weights: np.ndarray | None = None
    # the runtime floor per token of the whole tensor: {activation block: 1/2 sum (g W)^2 dx^2},
    # dx the matmul input's int8 rounding in blocks of that many (score.floor)
    floor: dict[int, float] | None = None

    def expert_of_kept(self) -> np.ndarray:
        """The expert each kept row belongs to."""
        return self.keep // (self.rows // self.experts)

    @property
    def row_weights(self) -> np.ndarray:
        if self.weights is not None:
            return self.weights
        return np.full(len(self.keep), self.rows / max(1, len(self.keep)))


def stratified_rows(n: int, present: np.ndarray, count: int) -> np.ndarray:
    """Rows of a token embedding to measure: every token the Fisher windows hold (their input
    gradients make the embedding's Fisher; it is zero on the others) and, up to ``count``, a
    fixed sample of the rest (a tied output's part)."""
    rest = np.setdiff1d(np.arange(n), present)
    pick = rest[kept_rows(len(rest), max(0, count - len(present)))]
    return np.sort(np.concatenate([present, pick]))


def fisher_windows(n: int, tokens: int, seq_len: int) -> list[int]:
    """The windows the Fisher is taken over: enough for ``tokens``, spread evenly over all n."""
    k = min(n, -(-tokens // seq_len))
    return sorted({j * n // k for j in range(k)})


def sample_labels(p, gen, rows: int = 64):
    """One label per row of the probabilities ``p`` (tokens x vocabulary), drawn with ``gen``:
    the row's argmax of p / E, E exponential - the race torch.multinomial runs, so a label
    changes only where two tokens nearly tie (bf16 and fp32 draw the same labels), but with
    E = -log U from uniforms, ``rows`` rows at a time: torch's exponential_ took 6 of the head's
    12 s at Gemma's 262k vocabulary."""
    import torch

    out = torch.empty(p.shape[0], dtype=torch.long, device=p.device)
    for i in range(0, p.shape[0], rows):
        blk = p[i:i + rows]
        e = torch.rand(blk.shape, generator=gen, device=p.device, dtype=blk.dtype)
        out[i:i + rows] = torch.div(blk, e.log_().neg_(), out=e).argmax(-1)
    return out
