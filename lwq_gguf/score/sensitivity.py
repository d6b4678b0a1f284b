"""Sensitivity: the expected KL-divergence each candidate type costs each tensor.

For every quantizable tensor t of the GGUF and every type q the plan may give it:

    damage(t, q) = 1/2 * sum_i F_i * (w_i - Q_q(w)_i)^2

* ``Q_q`` is the quantizer the file will be written with (:mod:`lwq_gguf.quant.encoder`: the pinned
  ggml's, as llama-quantize runs it, or lwq-gguf's own Q4_K encoder), run on the 16-bit weights
  with the importance matrix when one is used, so the error is the error the file will have;
* ``F`` is the diagonal of the Fisher information of the model's next-token distribution per
  token, estimated over the calibration text as E[g^2] with labels sampled from the model itself
  (so it is the curvature of KL(p_base || p) at the base weights, not of the text's loss); 1/2
  Delta^T F Delta is the second-order expansion of the mean per-token KLD.

Tensors are assumed to add up (the planner minimises the sum under the byte budget). The same
forward passes collect the importance matrix (mean squared input of every matmul weight, as
llama-imatrix does), used for quantizing with ``--imatrix auto``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from lwq_gguf.errors import UnsupportedModelError
from lwq_gguf.quant.imatrix import Imatrix
from lwq_gguf.quant.encoder import Quantizer, split_damage_key
from lwq_gguf.llamacpp import LlamaCpp
from lwq_gguf.model.load import HFModel
from lwq_gguf.quant.tensors import GGUFTensor
from lwq_gguf.quant.types import legal_type
from lwq_gguf.score.fisher import FisherTensor, streamed_fisher
from lwq_gguf.score.scores import ScoreConfig, sig6

MAX_ROWS = 4096  # rows of a tensor quantized to measure its damage (the embedding has 49152):
# rows quantize independently, so a fixed sample scaled up estimates the whole
BLOCK = 1 << 20  # weights per quantize/compare step


def tensor_damage(quantizer: Quantizer, w: np.ndarray, fisher: np.ndarray, types: list[str],
                  imatrix: np.ndarray | None, experts: np.ndarray | None = None
                  ) -> dict[str, float]:
    """1/2 sum F (w - Q(w))^2 for each type (in row blocks: float64 sums, small temporaries).

    ``experts``: the expert each row of a merged ``ffn_*_exps`` tensor belongs to, when
    ``imatrix`` holds one row per expert (each expert is quantized with its own)."""
    if imatrix is not None and imatrix.size != w.shape[1]:
        per_expert = imatrix.reshape(-1, w.shape[1])
        total = dict.fromkeys(types, 0.0)
        for e in np.unique(experts):
            sel = experts == e
            for ty, d in tensor_damage(quantizer, w[sel], fisher[sel], types,
                                       per_expert[e]).items():
                total[ty] += d
        return total
    step = max(1, BLOCK // w.shape[1])
    out = {}
    for ty in types:
        total = 0.0
        for i in range(0, w.shape[0], step):
            blk = w[i:i + step]
            e = (blk - quantizer.roundtrip(blk, ty, imatrix)).reshape(-1).astype(np.float64)
            total += float(np.dot(fisher[i:i + step].reshape(-1).astype(np.float64), e * e))
        out[ty] = 0.5 * total
    return out


@dataclass(frozen=True, kw_only=True)
class SensitivityRequest:
    """Which damage tables to measure: the ladder's types under each quantizer setting in
    ``keys`` (:func:`lwq_gguf.quant.encoder.damage_key`: the imatrix - "none", "auto" (computed
    from the calibration text) or the key of a ``given`` imatrix file - and the encoder)."""

    ladder: tuple[str, ...]
    keys: tuple[str, ...]
    given: Mapping[str, Imatrix] = field(default_factory=dict)


def measure_sensitivity(model: HFModel, tensors: tuple[GGUFTensor, ...], req: SensitivityRequest,
                        lc: LlamaCpp, cfg: ScoreConfig, progress: bool = True
                        ) -> tuple[dict, Imatrix]:
    """(sensitivity, the imatrix computed from the calibration text): the damage of every
    ladder type for every quantizable tensor under each setting of ``req``."""
    t0 = time.time()
    ladder = req.ladder
    run = streamed_fisher(model, cfg, progress, MAX_ROWS)
    known = {"none": None, "auto": run.imatrix, **req.given}
    modes = {k: known[split_damage_key(k)[0]] for k in req.keys}
    quantizers = {enc: Quantizer(lc, enc) for enc in {split_damage_key(k)[1] for k in req.keys}}
    todo = {t.name: t for t in tensors if t.quantizable}

    def one(t: GGUFTensor, ft: FisherTensor):
        types = sorted({legal_type(q, t.shape[0]) for q in ladder})
        scale = ft.rows / ft.weight.shape[0]  # rows sampled: the estimate of the whole
        experts = ft.expert_of_kept(MAX_ROWS) if ft.experts > 1 else None
        return t.name, {key: {ty: sig6(d * scale) for ty, d in tensor_damage(
            quantizers[split_damage_key(key)[1]], ft.weight, ft.fisher, types,
            m.weights(t.name) if m is not None else None, experts).items()}
            for key, m in modes.items()}

    damage: dict[str, dict] = {key: {} for key in modes}
    workers = os.cpu_count() or 1
    bar = tqdm(total=len(todo), desc="damage per type", unit="tensor", disable=not progress,
               leave=False)

    def collect(done):
        name, per_mode = done.result()
        for key, d in per_mode.items():
            damage[key][name] = d
        bar.update()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = set()
        for t in run.tensors:  # as the backward pass finishes each layer (rows sampled)
            if t.name in todo:
                pending.add(pool.submit(one, todo[t.name], t))
            del t
            while len(pending) > workers:  # bounded: a few tensors in memory at a time
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for d in done:
                    collect(d)
        for d in pending:
            collect(d)
    bar.close()
    missing = sorted(set(todo) - set(damage[next(iter(modes))])) if modes else []
    if missing:
        raise UnsupportedModelError(f"{model.path}: GGUF tensor {missing[0]} has no PyTorch weight "
                                    "for the sensitivity analysis: use --strategy lim")
    n_tok, im = run.tokens, run.imatrix
    return {"tokens": n_tok, "seconds": round(time.time() - t0, 1), "ladder": list(ladder),
            "damage": damage}, im
