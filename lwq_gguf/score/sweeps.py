"""The quantizer sweeps: what each candidate type costs a tensor, measured on its sampled rows.

    damage(t, q) = 1/2 sum_i F_i (w_i - Q_q(w)_i)^2  (over the sampled rows, each row counted
                                                       for the rows it stands for)

Nearly all of a sweep's time goes to the types whose quantizer searches every block for its
scales or grid points (``QuantType.searched``: the i-quants, Q2_K, Q4_K, Q5_K, Q4_1, Q5_1; 150 to
1,500 ns a weight at the pin against 5 to 65 for the plain-rounding types, ``bench/sweep_cost.py``).

An experiment, off by default (:data:`NO_THINNING`): a :class:`Thinning` sweeps those on every
``every``-th sampled row only and scales them by a *control*, the plain-rounding type nearest in
bits (Q1_0, Q2_0, Q3_K, Q4_0, Q5_0, Q6_K or Q8_0, swept whether or not the ladder offers it) on
all the sampled rows and on the thinned ones: ``damage(q) ~ thinned(q) * all(c) / thinned(c)``.
It cuts the sweeps' CPU time 4x, but on trained and grid-built weights a tensor's damage sits in
a few rows and blocks, differently for each type: thinned 4x, the estimate is off by 23-47 % for
one tensor in ten and the plans lose 3-41 % below 4 BPW (``bench/fidelity.py --thin 4``,
docs/results.md), far over the 1 % a shortcut may cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lwq_gguf.quant.encoder import Quantizer
from lwq_gguf.quant.types import QUANT_TYPES, legal_type
from lwq_gguf.score.sample import FisherTensor

BLOCK = 1 << 20  # weights per quantize/compare step
CONTROLS = ("q1_0", "q2_0", "q3_k", "q4_0", "q5_0", "q6_k", "q8_0")  # plain rounding, int grids


@dataclass(frozen=True, kw_only=True)
class Thinning:
    """Which of a tensor's sampled rows a searched type is swept on."""

    every: int = 4  # every this many sampled rows ...
    min_rows: int = 16  # ... but at least this many (all of them where there are fewer)

    def rows(self, n: int) -> np.ndarray | None:
        """Indices into the n sampled rows; None: every row (nothing to thin)."""
        k = max(self.min_rows, -(-n // self.every))
        if self.every <= 1 or k >= n:
            return None
        return np.linspace(0, n - 1, k).round().astype(np.int64)


NO_THINNING = Thinning(every=1)  # the default: every type on every sampled row


def control_for(ty: str, row_len: int) -> str | None:
    """The control a searched type is scaled by on rows of ``row_len`` (None: ``ty`` is swept on
    every sampled row: it does not search, or no control fits the row)."""
    if not QUANT_TYPES[ty].searched:
        return None
    fit = [c for c in CONTROLS if legal_type(c, row_len) == c]
    bpw = QUANT_TYPES[ty].bpw
    return min(fit, key=lambda c: (abs(QUANT_TYPES[c].bpw - bpw), QUANT_TYPES[c].bpw), default=None)


def tensor_damage(quantizer: Quantizer, w: np.ndarray, fisher: np.ndarray, types: Sequence[str],
                  imatrix: np.ndarray | None, experts: np.ndarray | None = None
                  ) -> dict[str, float]:
    """1/2 sum F (w - Q(w))^2 for each type (in row blocks: float64 sums, small temporaries).

    ``experts``: the expert each row of a merged ``ffn_*_exps`` tensor belongs to, when
    ``imatrix`` holds one row per expert (each expert is quantized with its own)."""
    if imatrix is not None and imatrix.size != w.shape[1]:
        assert experts is not None, "an imatrix per expert needs the rows' experts"
        per_expert = imatrix.reshape(-1, w.shape[1])
        totals = dict.fromkeys(types, 0.0)
        for e in np.unique(experts):
            sel = experts == e
            for ty, d in tensor_damage(quantizer, w[sel], fisher[sel], types,
                                       per_expert[e]).items():
                totals[ty] += d
        return totals
    step = max(1, BLOCK // w.shape[1])
    out = {}
    for ty in types:
        total = 0.0
        for i in range(0, w.shape[0], step):
            blk = w[i:i + step]
            e = (blk - quantizer.roundtrip(blk, ty, imatrix)).reshape(-1).astype(np.float64)
            f = fisher[i:i + step].reshape(-1).astype(np.float64)
            # (einsum, not np.dot: the BLAS dot spins its own threads against the pool's)
            total += float(np.einsum("i,i,i->", f, e, e))
        out[ty] = 0.5 * total
    return out


def runtime_floor(floor: dict[int, float] | None, ty: str) -> float:
    """What llama.cpp's CPU matmul adds to a tensor stored in ``ty`` by rounding its activations
    (score.floor; ``floor``: a FisherTensor's, measured in the same pass as the Fisher); 0 where
    not measured."""
    block = QUANT_TYPES[ty].act_block
    return floor.get(block, 0.0) if floor and block else 0.0


@dataclass(frozen=True)
class Swept:
    """One type's sweep on one tensor: its damage on the rows it was swept on and, when thinned,
    its control's on the same rows (``control``: None when swept on every sampled row)."""

    damage: float
    control: float | None = None


def sweep(quantizer: Quantizer, ft: FisherTensor, fisher: np.ndarray, ty: str,
          imatrix: np.ndarray | None, thinning: Thinning) -> Swept:
    """Sweep ``ty`` on the tensor's sampled rows (``fisher``: already weighted by what each row
    counts for), thinned with its control where it searches."""
    experts = ft.expert_of_kept() if ft.experts > 1 else None
    control = control_for(ty, ft.weight.shape[1])
    keep = thinning.rows(ft.weight.shape[0])
    if control is None or keep is None:
        return Swept(tensor_damage(quantizer, ft.weight, fisher, [ty], imatrix, experts)[ty])
    w, f = ft.weight[keep], fisher[keep]
    d = tensor_damage(quantizer, w, f, [ty, control], imatrix,
                      experts[keep] if experts is not None else None)
    if d[control] <= 0:  # (no Fisher on the thinned rows: scaled by their count instead)
        return Swept(d[ty] * ft.weight.shape[0] / len(keep))
    return Swept(d[ty], d[control])


def controls_needed(types: Sequence[str], row_len: int, thinning: Thinning) -> list[str]:
    """The controls the thinned types of a tensor need that are not among its ``types``."""
    if thinning.every <= 1:
        return []
    need = {c for ty in types if (c := control_for(ty, row_len)) is not None}
    return sorted(need - set(types))


def finish(swept: dict[str, Swept], row_len: int) -> dict[str, float]:
    """The tensor's damage per type from its sweeps (controls included): each thinned type
    scaled by its control's whole-sample damage."""
    out = {}
    for ty, s in swept.items():
        control = control_for(ty, row_len)
        out[ty] = (s.damage if s.control is None or control is None
                   else s.damage * swept[control].damage / s.control)
    return out
