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
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from lwq_gguf.ggml import Ggml
from lwq_gguf.imatrix import Imatrix
from lwq_gguf.llamacpp import LlamaCpp
from lwq_gguf.load import HFModel
from lwq_gguf.plan import GGUFTensor
from lwq_gguf.quants import legal_type
from lwq_gguf.score import ScoreConfig, calibration_ids, resolve_device


@dataclass(frozen=True)
class Sensitivity:
    damage: dict[str, dict[str, float]]  # GGUF tensor -> type -> expected mean KLD
    imatrix: str  # "none", or what the quantizer was given ("auto" or a file's sha256)
    tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return {"damage": self.damage, "imatrix": self.imatrix, "tokens": self.tokens,
                "seconds": round(self.seconds, 1)}

    @classmethod
    def from_dict(cls, d: dict) -> Sensitivity:
        return cls({k: dict(v) for k, v in d["damage"].items()}, d["imatrix"], int(d["tokens"]),
                   float(d["seconds"]))


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
    out = {}
    for ty in types:
        q = ggml.roundtrip(w, ty, imatrix)
        out[ty] = float(0.5 * np.dot(fisher.reshape(-1).astype(np.float64),
                                     ((w - q).reshape(-1).astype(np.float64)) ** 2))
    return out


def measure_sensitivity(model: HFModel, tensors: tuple[GGUFTensor, ...], ladder: tuple[str, ...],
                        lc: LlamaCpp, cfg: ScoreConfig, imatrix_mode: str,
                        given: Imatrix | None = None, progress: bool = True
                        ) -> tuple[Sensitivity, Imatrix]:
    """Damage of every ladder type for every quantizable tensor; and the computed imatrix.

    ``imatrix_mode``: "none" (quantize without), "auto" (the imatrix computed here), or a label
    for ``given`` (a user's file), which is then used for quantizing.
    """
    t0 = time.time()
    fis, im, weights, n_tok = fisher_and_imatrix(model, cfg, progress)
    use = None if imatrix_mode == "none" else (given or im)
    ggml = Ggml(lc)
    todo = [t for t in tensors if t.quantizable and t.name in weights]
    missing = [t.name for t in tensors if t.quantizable and t.name not in weights]
    if missing:
        raise ValueError(f"no PyTorch weight for GGUF tensor {missing[0]}")

    def one(t: GGUFTensor):
        types = sorted({legal_type(q, t.shape[0]) for q in ladder})
        imat = use.weights(t.name) if use is not None else None
        return t.name, tensor_damage(ggml, weights[t.name], fis[t.name], types, imat)

    damage = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for name, d in tqdm(pool.map(one, todo), total=len(todo), desc="damage per type",
                            unit="tensor", disable=not progress, leave=False):
            damage[name] = d
    return Sensitivity(damage, imatrix_mode, n_tok, time.time() - t0), im
