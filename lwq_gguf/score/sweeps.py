"""The quantizer sweeps: what each candidate type costs a tensor, measured on its sampled rows.

    damage(t, q) = 1/2 sum_i F_i (w_i - Q_q(w)_i)^2  (over the sampled rows, each row counted
                                                       for the rows it stands for)
                   + floor(t, block(q))               (the runtime floor, score.floor)

Every type is measured on every sampled row. Nearly all of the sweeps' time goes to the types
whose quantizer searches each block for its scales or grid points (the i-quants, Q2_K, Q4_K,
Q5_K, Q4_1, Q5_1), so those quantizers run rebuilt with exact speed-ups
(:mod:`lwq_gguf.quant.rebuilt`, the same bytes; ``bench/sweep_cost.py`` times both). Sweeping
them on fewer rows, scaled by a plain-rounding control type, was measured and rejected: a
tensor's damage sits in a few rows and blocks, differently for each type, and the plans lost up
to 41 % (docs/results.md, *Fidelity*).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lwq_gguf.quant.encoder import Quantizer
from lwq_gguf.quant.types import QUANT_TYPES

BLOCK = 1 << 20  # weights per quantize/compare step


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
