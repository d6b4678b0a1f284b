"""Sensitivity: the expected KL-divergence each candidate type costs each tensor.

For every quantizable tensor t of the GGUF and every type q the plan may give it:

    damage(t, q) = 1/2 * sum_i F_i * (w_i - Q_q(w)_i)^2  +  floor(t, block(q))

* ``Q_q`` is the quantizer the file will be written with (:mod:`lwq_gguf.quant.encoder`: the pinned
  ggml's, as llama-quantize runs it, or lwq-gguf's own Q4_K encoder), run on the 16-bit weights
  with the importance matrix when one is used, so the error is the error the file will have;
* ``F`` is the diagonal of the Fisher information of the model's next-token distribution per
  token, estimated over the calibration text as E[g^2] with labels sampled from the model itself
  (so it is the curvature of KL(p_base || p) at the base weights, not of the text's loss); 1/2
  Delta^T F Delta is the second-order expansion of the mean per-token KLD.

* ``floor`` is the runtime floor: llama.cpp's CPU backend rounds a quantized matmul's
  activations to int8 blocks (32 for Q4_0 … Q8_0, IQ4_NL, MXFP4, NVFP4; 256 for the K-quants and
  the other i-quants), which costs KLD however exactly the weights are stored; estimated in the
  same backward pass, 1/2 sum (g W)^2 dx^2 per token (:mod:`lwq_gguf.score.floor`;
  checked against single-tensor KLD by ``bench/act_floor.py``).

Tensors are assumed to add up (the planner minimises the sum under the byte budget). The same
forward passes collect the importance matrix (mean squared input of every matmul weight, as
llama-imatrix does), used for quantizing with ``--imatrix auto``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from threading import Thread
from dataclasses import dataclass, field

import numpy as np

from lwq_gguf.errors import UnsupportedModelError
from lwq_gguf.quant.imatrix import Imatrix
from lwq_gguf.quant.encoder import Quantizer, split_damage_key
from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.model.load import HFModel
from lwq_gguf.model.inventory import GGUFTensor
from lwq_gguf.quant.types import QUANT_TYPES, legal_types
from lwq_gguf.score.clock import Phases, Progress
from lwq_gguf.score.fisher import streamed_fisher
from lwq_gguf.score.layers import torch_device
from lwq_gguf.score.sample import FisherTensor, RowSample
from lwq_gguf.score.sweeps import runtime_floor, tensor_damage
from lwq_gguf.score.scores import ScoreConfig, sig6

ROWS = RowSample()  # the rows measured per tensor (score.sample)


@dataclass(frozen=True, kw_only=True)
class SensitivityRequest:
    """Which damage tables to measure: the ladder's types under each quantizer setting in
    ``keys`` (:func:`lwq_gguf.quant.encoder.damage_key`: the imatrix - "none", "auto" (computed
    from the calibration text) or the key of a ``given`` imatrix file - and the encoder)."""

    ladder: tuple[str, ...]
    keys: tuple[str, ...]
    given: Mapping[str, Imatrix] = field(default_factory=dict)
    rows: RowSample = ROWS  # the rows measured (score.sample)


@dataclass(frozen=True)
class Measured:
    """What one streamed pass measured: the layer scores, the damage tables and the imatrix."""

    lim: tuple[float, ...]
    zd: tuple[float, ...]
    tokens: int
    device: str
    sensitivity: dict  # {"tokens", "seconds", "ladder", "damage", "phases"}
    imatrix: Imatrix


SWEEP_COST = 900  # one weight quantized to one type and back, in tokens through a layer per
# layer weight (measured on 2 cores: a sweep ~37 ns, a token-layer ~0.04 ns per layer weight);
# only the progress bar's ETA depends on it


def measure_sensitivity(model: HFModel, tensors, req: SensitivityRequest, cfg: ScoreConfig,
                        progress: bool = True, phases: Phases | None = None) -> Measured:
    """LIM, ZD, the imatrix computed from the calibration text and the damage of every ladder
    type for every quantizable tensor under each setting of ``req``, in one streamed pass.
    ``tensors``: the GGUF tensor list, or a function that returns it (called after the forward
    pass, so that a slow listing runs meanwhile)."""
    t0 = time.time()
    phases = phases if phases is not None else Phases()
    ladder, rows = req.ladder, req.rows
    fisher = cfg.fisher_tokens
    bar = Progress(model.n_layers * (cfg.calib_tokens + 2 * fisher), progress,
                   f"scoring ({torch_device(cfg.device)})")
    lc = find_llama_cpp()
    quantizers = {enc: Quantizer(lc, enc) for enc in {split_damage_key(k)[1] for k in req.keys}}
    # the quantizers' grids set up on a second core while the pass starts on one (its setup)
    def set_up() -> None:
        for q in quantizers.values():
            q.prepare(ladder)

    grids = Thread(target=set_up)
    grids.start()
    bar.stage("forward")
    try:
        run = streamed_fisher(model, cfg, progress, rows, phases, bar.update)
    finally:
        grids.join()
    with phases("list"):  # (the converter's tensor list, made meanwhile when not cached)
        todo = {t.name: t for t in (tensors() if callable(tensors) else tensors) if t.quantizable}
    layer_weights = sum(t.numel for t in todo.values() if t.layer is not None) / max(
        1, model.n_layers)
    sweep_cost = lambda n: n * SWEEP_COST / max(1.0, layer_weights)  # noqa: E731
    sampled = sum(rows.count(t.numel // t.shape[0], t.shape[0], t.layer is None) * t.shape[0]
                  for t in todo.values())
    bar.grow(sweep_cost(sampled * len(ladder) * len(req.keys)))
    known = {"none": None, "auto": run.imatrix, **req.given}
    modes = {k: known[split_damage_key(k)[0]] for k in req.keys}

    def one(t: GGUFTensor, ft: FisherTensor, fisher: np.ndarray, ty: str):
        """One type on one tensor under every setting (a task: the pool balances them)."""
        experts = ft.expert_of_kept() if ft.experts > 1 else None
        with phases.thread_cpu("sweeps"):
            out = {}
            for key, m in modes.items():
                im = m.weights(t.name) if m is not None else None
                if im is None and QUANT_TYPES[ty].needs_imatrix:
                    continue  # offered only with an importance matrix
                d = tensor_damage(quantizers[split_damage_key(key)[1]], ft.weight, fisher, [ty],
                                  im, experts)[ty]
                out[key] = sig6(d + runtime_floor(ft.floor, ty))
        bar.update(sweep_cost(ft.weight.size * len(modes)))
        return t.name, ty, out

    def tasks(ft: FisherTensor) -> list:
        """The tensor's tasks (one per candidate type), sharing its Fisher weighted by what each
        sampled row counts for."""
        t = todo[ft.name]
        fisher = ft.fisher * ft.row_weights.astype(np.float32)[:, None]
        return [(t, ft, fisher, ty) for ty in legal_types(ladder, t.shape[0])]

    swept: dict[str, dict] = {key: {} for key in modes}  # (every tensor has its row, even
    # when all of its types need the imatrix a setting lacks)
    workers = os.cpu_count() or 1

    def collect(done):
        name, ty, per_mode = done.result()
        for key in modes:
            swept[key].setdefault(name, {})
        for key, d in per_mode.items():
            swept[key][name][ty] = d

    # on a GPU the sweeps run on the CPU while the backward pass goes on; on the CPU after it
    # (both at once would oversubscribe the cores: PyTorch's threads spin while they wait)
    overlap = run.device != "cpu"
    bar.stage("backward + sweeps" if overlap else "backward")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending, held = set(), []
        for t in run.tensors:  # as the backward pass finishes each layer (rows sampled)
            if t.name not in todo:
                continue
            if not overlap:
                held.append(t)
                continue
            pending |= {pool.submit(one, *task) for task in tasks(t)}
            del t
            while len(pending) > 64 * workers:  # bounded: a few tensors in memory at a time
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for d in done:
                    collect(d)
        # the largest first, so that no long task is left alone at the end
        if held:
            bar.stage("sweeps")
        for t in sorted(held, key=lambda t: -t.weight.size):
            pending |= {pool.submit(one, *task) for task in tasks(t)}
        del held
        with phases("wait"):
            for d in pending:
                collect(d)
    bar.close()
    damage = {key: {name: dict(sorted(row.items())) for name, row in sorted(table.items())}
              for key, table in swept.items()}
    missing = sorted(set(todo) - set(damage[next(iter(modes))])) if modes else []
    if missing:
        raise UnsupportedModelError(f"{model.path}: GGUF tensor {missing[0]} has no PyTorch weight "
                                    "for the sensitivity analysis: use --strategy lim")
    q = next(iter(quantizers.values()), None)  # (which quantizers the sweeps ran; none: no sweep)
    used = ("" if q is None else "rebuilt" if q.rebuilt is not None
            else f"pinned ({q.why_not_rebuilt})")
    sens = {"tokens": run.tokens, "fisher_tokens": run.fisher_tokens, "precision": run.precision,
            "quantizers": used,
            "seconds": round(time.time() - t0, 1), "ladder": list(ladder),
            "damage": damage, "phases": phases.report()}
    return Measured(run.lim, run.zd, run.tokens, run.device, sens, run.imatrix)
