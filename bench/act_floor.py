"""Probe: can the runtime floor be estimated? llama.cpp's activation rounding, against the truth.

    .venv/bin/python bench/act_floor.py [--truth bench/results/truth-smollm2-135m-k256-cont.json]

bench/truth.py found that the types whose weights err least (Q5_K, Q6_K, Q8_0) cost more in
llama.cpp than the planner estimates: a quantized matmul on the CPU rounds its *activations*
too, to Q8_0 or Q8_1 blocks of 32 (Q4_0 … Q8_0, IQ4_NL, MXFP4) or to Q8_K blocks of 256 (the
K-quants and i-quants), and that rounding is not in the weight-error estimate. This probe
estimates it the way the planner estimates weight error, from the model's own gradients:

    floor(tensor, blocks) = 1/2 * sum over tokens t, inputs j of  gx[t, j]^2 * dx[t, j]^2 / tokens

where ``dx`` is the input's rounding error to int8 blocks of 32 or 256 (scale max|x|/127, as
ggml's quantize_row_q8_0 / q8_K), and ``gx = g W`` the gradient that reaches the input through
this matmul alone (labels sampled from the model, as the Fisher is; 1,024 calibration tokens in
windows of 512). It compares, per tensor of the truth's sample, that estimate with the measured
excess, measured KLD minus the weight-error estimate, of the types rounding to those blocks:
Q8_0 (blocks of 32) and Q6_K (blocks of 256), whose own weight error is the smallest of each.

Writes bench/results/act-floor-MODEL.{json,md}. The planner forms the same quantity in its scoring
pass (lwq_gguf/score/floor.py); this probe is its independent check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from harness import RESULTS, ROOT, parser, write_results

from truth import spearman

from lwq_gguf.model.load import open_model
from lwq_gguf.report import markdown_table
from lwq_gguf.score.sample import sample_labels
from lwq_gguf.score.layers import calibration_ids
from lwq_gguf.score.scores import ScoreConfig

BLOCKS = {"q8_0": 32, "q6_k": 256}  # the truth's type -> the activation block it rounds to


def round_error(x, block: int):
    """x minus its int8 rounding in blocks of ``block`` along the last axis (scale amax/127)."""
    import torch

    n = x.shape[-1] - x.shape[-1] % block
    xb = x[..., :n].reshape(*x.shape[:-1], n // block, block)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xb / d.clamp_min(1e-30)).clamp(-127, 127) * d, xb)
    err = torch.zeros_like(x)
    err[..., :n] = (xb - q).reshape(*x.shape[:-1], n)
    return err


def floors(model_dir: Path, tokens: int, seed: int) -> dict[str, dict[str, float]]:
    """{GGUF tensor name: {truth type: estimated floor}} over ``tokens`` calibration tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from lwq_gguf.model.arch import gguf_names

    hf = open_model(model_dir)
    cfg = ScoreConfig(fisher_tokens=tokens)
    ids = calibration_ids(hf, cfg)[:tokens]
    lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lm.eval()
    assert hf.arch is not None, f"{model_dir}: no architecture entry"
    names = gguf_names(lm, hf.arch, hf.n_layers)
    acc: dict[str, dict[str, float]] = {}
    lins = {n: m for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    tied = lm.lm_head.weight is lm.model.embed_tokens.weight

    def gguf(n: str) -> str:
        if n == "lm_head" and tied:
            return "token_embd.weight"
        return names[n + ".weight"][0]

    def hook_for(n, mod):
        def hook(_m, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1])

            def on_grad(g):
                gx = g.reshape(-1, g.shape[-1]) @ mod.weight.detach()
                slot = acc.setdefault(gguf(n), dict.fromkeys(BLOCKS, 0.0))
                for t, b in BLOCKS.items():
                    slot[t] += 0.5 * float((gx.square() * round_error(x, b).square()).sum())
            out.register_hook(on_grad)
        return hook

    handles = [m.register_forward_hook(hook_for(n, m)) for n, m in lins.items()
               if n == "lm_head" or n + ".weight" in names]
    gen = torch.Generator().manual_seed(seed)
    try:
        for i in range(0, len(ids), cfg.seq_len):
            w = torch.tensor([ids[i:i + cfg.seq_len]])
            logits = lm(w).logits[0].float()
            y = sample_labels(torch.softmax(logits.detach(), -1), gen)
            torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
    return {k: {t: v / len(ids) for t, v in d.items()} for k, d in acc.items()}


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--truth", type=Path,
                    default=RESULTS / "truth-smollm2-135m-k256-cont.json")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    truth = json.loads(a.truth.read_text())
    model = ROOT / truth["model"] if not Path(truth["model"]).is_absolute() else Path(truth["model"])
    est = floors(model, a.tokens, a.seed)
    pairs = {(p["tensor"], p["type"]): p for p in truth["pairs"]}
    rows, out = [], []
    for tensor in sorted({t for t, _ in pairs}):
        for typ in BLOCKS:
            p = pairs.get((tensor, typ))
            if p is None or tensor not in est:
                continue
            excess = p["kld"] - p["estimate"]
            f = est[tensor][typ]
            out.append({"tensor": tensor, "type": typ, "measured": p["kld"],
                        "weight_estimate": p["estimate"], "excess": excess, "floor": f})
            rows.append((tensor, typ, f"{p['kld']:.3g}", f"{p['estimate']:.3g}",
                         f"{excess:.3g}", f"{f:.3g}", f"{excess / f:.2f}" if f > 0 else "-"))
    summary = {}
    for typ in BLOCKS:
        r = [o for o in out if o["type"] == typ]
        ratio = [o["excess"] / o["floor"] for o in r if o["floor"] > 0]
        total = [o["weight_estimate"] + o["floor"] for o in r]
        summary[typ] = {
            "pairs": len(r),
            "rank_excess_vs_floor": spearman([o["excess"] for o in r], [o["floor"] for o in r]),
            "excess_over_floor_median": float(np.median(ratio)) if ratio else None,
            "measured_over_weight_estimate_median": float(np.median(
                [o["measured"] / o["weight_estimate"] for o in r])),
            "measured_over_estimate_with_floor_median": float(np.median(
                [o["measured"] / t for o, t in zip(r, total)])),
        }
    doc = {"truth": str(a.truth.relative_to(ROOT) if a.truth.is_relative_to(ROOT) else a.truth),
           "model": truth["model"], "tokens": a.tokens, "seed": a.seed, "blocks": BLOCKS,
           "summary": summary, "pairs": out}
    head = ("| type | pairs | rank (excess, floor) | excess / floor: median | measured / weight "
            "estimate: median | measured / (weight estimate + floor): median |")
    lines = [head, "|---|---|---|---|---|---|"] + [
        f"| {t} | {s['pairs']} | {s['rank_excess_vs_floor']:.2f} | "
        f"{s['excess_over_floor_median']:.2f} | {s['measured_over_weight_estimate_median']:.2f} | "
        f"{s['measured_over_estimate_with_floor_median']:.2f} |" for t, s in summary.items()]
    md = "\n".join(lines) + "\n\n" + markdown_table(
        ("tensor", "type", "measured KLD", "weight estimate", "excess", "floor estimate",
         "excess / floor"), rows)
    name = Path(truth["model"]).name
    write_results(RESULTS / f"act-floor-{name}.json", doc,
                  f"Probe: the activation-rounding floor against the truth: {name}", md)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
