"""Stage 2b - sensitivity: the expected KL-divergence each candidate type costs each tensor.

For every quantizable tensor t of the GGUF and every type q the plan may give it:

    damage(t, q) = 1/2 * sum_i F_i * (w_i - Q_q(w)_i)^2

* ``Q_q`` is ggml's own quantizer from the pinned build (:mod:`lwq_gguf.ggml`), run on the 16-bit
  weights exactly as llama-quantize runs it, with the importance matrix when one is used, so the
  error is the error the file will have;
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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from lwq_gguf.errors import UnsupportedModelError
from lwq_gguf.ggml import Ggml
from lwq_gguf.imatrix import Imatrix
from lwq_gguf.llamacpp import LlamaCpp
from lwq_gguf.load import HFModel
from lwq_gguf.plan import GGUFTensor
from lwq_gguf.quants import legal_type
from lwq_gguf.score import ScoreConfig, calibration_ids, resolve_device, sig6

MAX_ROWS = 4096  # rows of a tensor quantized to measure its damage (the embedding has 49152)


def gguf_names(lm, n_layers: int) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name, for the 2-D weights the converter writes."""
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    out = {}
    for name, p in lm.named_parameters(remove_duplicate=True):
        if p.dim() == 2:
            g = tmap.get_name(name, try_suffixes=(".weight",))
            if g:
                out[name] = g
    return out


def fisher_and_imatrix(model: HFModel, cfg: ScoreConfig, progress: bool = True):
    """(Fisher diagonal per GGUF tensor (HF layout, float32 numpy), Imatrix, 16-bit weights, tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device)
    ids = calibration_ids(model, cfg)
    lm = AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32).to(device)
    lm.eval()
    names = gguf_names(lm, model.n_layers)
    params = dict(lm.named_parameters())
    half = torch.bfloat16 if any(t.dtype == "BF16" for t in model.tensors) else torch.float16
    with torch.no_grad():  # the weights the 16-bit base GGUF holds
        for hf in names:
            params[hf].copy_(params[hf].to(half).float())
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(gname):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[gname] = sums.get(gname, 0) + (x * x).sum(0)
            counts[gname] = counts.get(gname, 0) + x.shape[0]
        return hook

    handles = []
    for mod_name, mod in lm.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod_name + ".weight" in names:
            gname = names[mod_name + ".weight"]
            handles.append(mod.register_forward_pre_hook(hook_for(gname)))
    if tied:  # llama.cpp multiplies by token_embd.weight for the output
        handles.append(lm.get_output_embeddings().register_forward_pre_hook(
            hook_for("token_embd.weight")))
    fisher = {hf: torch.zeros_like(params[hf]) for hf in names}
    gen = torch.Generator(device=device).manual_seed(0)
    windows = [ids[s: s + cfg.seq_len] for s in range(0, len(ids), cfg.seq_len)]
    windows = [w for w in windows if len(w) > 1]
    try:
        for w in tqdm(windows, desc=f"Fisher + imatrix ({device})", unit="window",
                      disable=not progress, leave=False):
            lm.zero_grad(set_to_none=True)
            logits = lm(input_ids=torch.tensor([w], device=device), use_cache=False).logits[0]
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen)[:, 0]
            torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
            with torch.no_grad():
                for hf in names:
                    fisher[hf] += params[hf].grad ** 2
    finally:
        for h in handles:
            h.remove()
    n_tok = sum(len(w) for w in windows)
    fis = {names[hf]: (f / n_tok).cpu().numpy() for hf, f in fisher.items()}
    weights = {names[hf]: params[hf].detach().cpu().numpy() for hf in names}
    im = Imatrix({k: v.cpu().numpy() for k, v in sums.items()}, dict(counts),
                 cfg.calib_file.name, cfg.seq_len, len(windows))
    return fis, im, weights, n_tok


def tensor_damage(ggml: Ggml, w: np.ndarray, fisher: np.ndarray, types: list[str],
                  imatrix: np.ndarray | None) -> dict[str, float]:
    """1/2 sum F (w - Q(w))^2 for each type."""
    f = fisher.reshape(-1).astype(np.float64)
    return {ty: (0.5 * float(np.dot(f, (w - ggml.roundtrip(w, ty, imatrix)).reshape(-1)
                                        .astype(np.float64) ** 2)))
            for ty in types}


def measure_sensitivity(model: HFModel, tensors: tuple[GGUFTensor, ...], ladder: tuple[str, ...],
                        lc: LlamaCpp, cfg: ScoreConfig, keys: tuple[str, ...] = ("auto",),
                        given: dict[str, Imatrix] | None = None, progress: bool = True
                        ) -> tuple[dict, Imatrix]:
    """(sensitivity, the imatrix computed from the calibration text).

    The sensitivity holds the damage of every ladder type for every quantizable tensor under each
    quantizer setting in ``keys``: "none" (no imatrix), "auto" (the computed imatrix) or the key
    of a ``given`` imatrix.
    """
    t0 = time.time()
    fis, im, weights, n_tok = fisher_and_imatrix(model, cfg, progress)
    known = {"none": None, "auto": im, **(given or {})}
    modes = {k: known[k] for k in keys}
    ggml = Ggml(lc)
    todo = [t for t in tensors if t.quantizable]
    missing = [t.name for t in todo if t.name not in weights]
    if missing:
        raise UnsupportedModelError(f"{model.path}: GGUF tensor {missing[0]} has no PyTorch weight "
                                    "for the sensitivity analysis: use --strategy lim")

    def one(t: GGUFTensor):
        types = sorted({legal_type(q, t.shape[0]) for q in ladder})
        w, f = weights[t.name], fis[t.name]
        if w.shape[0] > MAX_ROWS:  # a fixed sample of rows, scaled up: rows quantize independently
            rows = np.sort(np.random.default_rng(0).choice(w.shape[0], MAX_ROWS, replace=False))
            w, f, scale = w[rows], f[rows], weights[t.name].shape[0] / MAX_ROWS
        else:
            scale = 1.0
        return t.name, {key: {ty: sig6(d * scale) for ty, d in tensor_damage(
            ggml, w, f, types, m.weights(t.name) if m is not None else None).items()}
            for key, m in modes.items()}

    damage: dict[str, dict] = {key: {} for key in modes}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for name, per_mode in tqdm(pool.map(one, todo), total=len(todo), desc="damage per type",
                                   unit="tensor", disable=not progress, leave=False):
            for key, d in per_mode.items():
                damage[key][name] = d
    return {"tokens": n_tok, "seconds": round(time.time() - t0, 1), "ladder": list(ladder),
            "damage": damage}, im
