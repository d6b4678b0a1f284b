"""Which second-order form predicts single-tensor KLD: the diagonal Fisher, a row-wise one, or
the full per-token form - measured against bench/truth.py's pairs.

    .venv/bin/python bench/fisher_forms.py [--model models/gemma3-270m] [--tokens 1024]

On the calibration text (labels sampled from the model, as the sensitivity analysis does), for
every layer tensor in truth's OUT/pairs.json, with x the matmul's input and g the gradient of its
output per token, and E = W - Q(W) (ggml's encoders, the same imatrix as the truth files):

* diag:    1/2 sum_ij E_ij^2 mean_t g_ti^2 x_tj^2   (what the planner uses)
* rowwise: 1/2 mean_t sum_i g_ti^2 (E_i . x_t)^2    (input correlations kept, rows independent)
* full:    1/2 mean_t (g_t . E x_t)^2               (one sampled label per token)

Writes bench/results/fisher-forms-MODEL.{json,md}: per form the rank correlation with the measured
KLD over all pairs and per type, and the median measured / estimated ratio per type.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from harness import RESULTS, ROOT, parser, write_results

from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.quant.encoder import Quantizer
from lwq_gguf.quant.imatrix import read_imatrix
from lwq_gguf.quant.types import QUANT_TYPES
from lwq_gguf.report import markdown_table, table
from lwq_gguf.score.sample import sample_labels
from lwq_gguf.score.scores import default_calibration

HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
      "ffn_down": "mlp.down_proj"}
FORMS = ("diag", "rowwise", "full", "wdiag", "wfull")
COLS = ("estimate",) + FORMS  # estimate: the planner's (bench/truth.py)


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def capture(model_dir: Path, modules: list[str], tokens: int, window: int = 512, seed: int = 0):
    """x (input) and g (output gradient) per token of each module, labels sampled from the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = tok(default_calibration().read_text())["input_ids"][:tokens]
    xs = {m: [] for m in modules}
    gs = {m: [] for m in modules}
    hooks = []
    for name in modules:
        mod = model.get_submodule(name)
        hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: xs[n].append(i[0][0].detach())))
        hooks.append(mod.register_full_backward_hook(
            lambda m, gi, go, n=name: gs[n].append(go[0][0].detach())))
    gen = torch.Generator().manual_seed(seed)
    n = 0
    for s in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[s:s + window]])
        logits = model(chunk).logits[0]
        with torch.no_grad():
            labels = sample_labels(torch.softmax(logits, -1), gen)
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        model.zero_grad(set_to_none=True)
        loss.backward()
        n += chunk.shape[1]
    for h in hooks:
        h.remove()
    x = {m: [t.double().numpy() for t in v] for m, v in xs.items()}  # per window
    g = {m: [t.double().numpy() for t in v] for m, v in gs.items()}
    w = {m: model.get_submodule(m).weight.detach().double().numpy() for m in modules}
    return x, g, w, n


def forms(e: np.ndarray, xw: list, gw: list) -> dict[str, float]:
    """e: rows x cols error; per window x: T x cols, g: T x rows. w*: the window-summed
    gradient squared (the planner's estimator of the same diagonal / full form)."""
    x, g = np.concatenate(xw), np.concatenate(gw)
    t = len(x)
    fisher = (g ** 2).T @ (x ** 2) / t
    out = e @ x.T  # rows x T: each row's output error per token
    wf = sum((gi.T @ xi) ** 2 for gi, xi in zip(gw, xw)) / t
    wfull = sum(float((gi.T * (e @ xi.T)).sum()) ** 2 for gi, xi in zip(gw, xw)) / t
    return {"diag": 0.5 * float((fisher * e ** 2).sum()),
            "rowwise": 0.5 * float(((g.T ** 2) * out ** 2).sum() / t),
            "full": 0.5 * float(((g.T * out).sum(axis=0) ** 2).mean()),
            "wdiag": 0.5 * float((wf * e ** 2).sum()), "wfull": 0.5 * wfull}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "gemma3-270m")
    ap.add_argument("--truth", type=Path, default=None, help="truth's OUT folder")
    ap.add_argument("--tokens", type=int, default=1024)
    a = ap.parse_args()
    name = a.model.resolve().name
    truth = a.truth or ROOT / "out" / "truth" / name
    pairs = [p for p in json.loads((truth / "pairs.json").read_text()).values()
             if p["tensor"].startswith("blk.")]
    modules, gguf_of = [], {}
    for p in pairs:
        m = re.match(r"blk\.(\d+)\.(\w+)\.weight", p["tensor"])
        hf = f"model.layers.{m.group(1)}.{HF[m.group(2)]}"
        if hf not in gguf_of:
            modules.append(hf)
            gguf_of[hf] = p["tensor"]
    t0 = time.time()
    x, g, w, n = capture(a.model, modules, a.tokens)
    q = Quantizer(find_llama_cpp(), "ggml")
    im = read_imatrix(truth / "imatrix.gguf")
    by_name = {v: k for k, v in gguf_of.items()}
    rows = []
    for p in pairs:
        hf = by_name[p["tensor"]]
        wt = w[hf].astype(np.float32)
        if p["tensor"].endswith(("attn_q.weight", "attn_k.weight")):
            pass  # (rows permuted or not, each row quantizes alone: the same errors)
        e = (wt - q.roundtrip(wt, p["type"], im.weights(p["tensor"]))).astype(np.float64)
        rows.append({**p, **forms(e, x[hf], g[hf])})
    summary = {"all": {f: spearman([r[f] for r in rows], [r["kld"] for r in rows]) for f in COLS}}
    head = ("type", "pairs") + tuple(f"{f} rank" for f in COLS) + tuple(f"{f} meas/est" for f in COLS)
    cells = []
    for ty in sorted({r["type"] for r in rows}, key=lambda t: QUANT_TYPES[t].bpw):
        rs = [r for r in rows if r["type"] == ty]
        s = {f: spearman([r[f] for r in rs], [r["kld"] for r in rs]) if len(rs) > 2 else None
             for f in COLS}
        med = {f: float(np.median([r["kld"] / r[f] for r in rs if r[f] > 0])) for f in COLS}
        summary[ty] = {"pairs": len(rs), "spearman": s, "ratio_median": med}
        cells.append((ty, len(rs), *[("-" if s[f] is None else f"{s[f]:.2f}") for f in COLS],
                      *[f"{med[f]:.3g}" for f in COLS]))
    print(table(head, cells))
    print("all pairs, rank correlation:", {f: round(v, 3) for f, v in summary["all"].items()})
    write_results(
        RESULTS / f"fisher-forms-{name}.json",
        {"model": str(a.model), "tokens": n, "seconds": round(time.time() - t0),
         "summary": summary, "rows": rows},
        f"Second-order forms against single-tensor KLD: {name}",
        f"{n} calibration tokens; truth from bench/truth.py ({len(rows)} layer pairs)\n\n"
        "Rank correlation over all pairs: "
        + ", ".join(f"{f} {v:.3f}" for f, v in summary["all"].items())
        + f"\n\n{markdown_table(head, cells)}")

if __name__ == "__main__":
    main()
