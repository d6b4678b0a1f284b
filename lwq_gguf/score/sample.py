"""What the sensitivity analysis samples: the rows of each tensor it measures (and what it
measures there), the calibration windows the Fisher is taken over and the labels it is taken
with.

Rows quantize independently (every ggml type encodes a row block by block), so the damage of a
type on a tensor is a sum over rows, estimated from a fixed random sample of rows scaled up by
rows / sampled. The sample is sized in weights (:class:`RowSample`): about ``weights`` per
tensor, at least ``min_rows`` rows; a vocabulary-sized output keeps ``vocab_rows`` rows (a token
embedding is sampled by :func:`stratified_rows`). Only the sampled rows'
Fisher is ever formed, so the backward pass computes their weight gradients alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class RowSample:
    weights: int | None = 1 << 16  # about this many weights per tensor; None: every row
    min_rows: int = 64
    vocab_rows: int | None = 2048  # rows of the output / token embedding (None: every row)
    max_rows: int | None = None  # a cap on every tensor (tests)

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
        """The sampled rows (sorted; all rows when the sample would hold them all)."""
        return kept_rows(n_rows, self.count(n_rows, n_cols, vocab))


EVERY_ROW = RowSample(weights=None, vocab_rows=None)


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
