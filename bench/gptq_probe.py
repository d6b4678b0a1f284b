"""Probe: how much layer-output error would error feedback (GPTQ) inside ggml's Q4_K remove?

    .venv/bin/python bench/gptq_probe.py [--model DIR] [--layers 2,15,27] [--tokens 4096]

Not a feature yet: a measurement that decides the next step of the quality work. For a few layers
of the continuous-weight demo model it collects H = X^T X of each linear layer's input over the
packaged calibration text (transformers, float32), and compares the layer output error
tr((W - Q) H (W - Q)^T) of

* Q4_K round-to-nearest, as the file writer makes it (lwq-gguf's encoder), with and without the
  imatrix (diag H / tokens);
* Q4_K with error feedback: each 256-column super-block's scales and mins are fixed by the same
  encoder on the (already updated) weights, then its columns are rounded one by one to that grid
  and each column's error is pushed onto the columns not yet quantized through the Cholesky factor
  of H^-1 (GPTQ, 1 % damping) - the result is still a valid Q4_K tensor;
* Q5_K round-to-nearest with the imatrix (a whole bit more), for scale.

Writes bench/results/gptq-probe.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lwq_gguf.llamacpp import find_llama_cpp  # noqa: E402
from lwq_gguf.quant.encoder import Quantizer  # noqa: E402
from lwq_gguf.report import machine, markdown_table, table  # noqa: E402
from lwq_gguf.score.scores import default_calibration  # noqa: E402

MODEL = ROOT / "models" / "smollm2-135m-k256-cont"
LINEAR = {"attn_q": "self_attn.q_proj", "attn_output": "self_attn.o_proj",
          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hessians(model_dir: Path, layers: list[int], tokens: int) -> tuple[dict, dict]:
    """{(layer, kind): X^T X (float64)} of each probed linear layer's input, and the weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(default_calibration().read_text(), return_tensors="pt").input_ids[0]
    ids = ids[: tokens // 512 * 512].view(-1, 512)
    hs, weights, hooks = {}, {}, []

    def hook(key):
        def add(_mod, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            hs[key] = hs.get(key, 0) + x.T @ x
        return add

    for layer in layers:
        blk = model.model.layers[layer]
        for kind, attr in LINEAR.items():
            mod = blk.get_submodule(attr)
            hooks.append(mod.register_forward_pre_hook(hook((layer, kind))))
            weights[layer, kind] = mod.weight.detach().double().numpy()
    with torch.no_grad():
        for row in ids:
            model(row[None])
    return {k: v.numpy() for k, v in hs.items()}, weights


def q4k_grid(raw: bytes, nrows: int, ncols: int) -> tuple[np.ndarray, np.ndarray]:
    """(step, offset) of every 32-weight sub-block of Q4_K rows: weight = step * q + offset."""
    b = np.frombuffer(raw, dtype=np.uint8).reshape(nrows, ncols // 256, 144)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    dmin = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    q = b[..., 4:16].astype(np.int32)
    step, off = np.zeros(q.shape[:-1] + (8,)), np.zeros(q.shape[:-1] + (8,))
    for j in range(8):  # ggml's get_scale_min_k4
        if j < 4:
            sc, m = q[..., j] & 63, q[..., j + 4] & 63
        else:
            sc = (q[..., j + 4] & 0xF) | ((q[..., j - 4] >> 6) << 4)
            m = (q[..., j + 4] >> 4) | ((q[..., j] >> 6) << 4)
        step[..., j], off[..., j] = d * sc, -dmin * m
    return step.reshape(nrows, -1), off.reshape(nrows, -1)


def q4k_feedback(qz: Quantizer, w: np.ndarray, h: np.ndarray, imatrix: np.ndarray,
                 damp: float = 0.01) -> np.ndarray:
    """Q4_K of ``w`` with GPTQ error feedback (dequantized)."""
    w, n = w.copy(), w.shape[1]
    u = np.linalg.cholesky(np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(n))).T
    out = np.zeros_like(w)
    for b0 in range(0, n, 256):
        raw = qz.quantize(w[:, b0:b0 + 256].astype(np.float32), "q4_k",
                          imatrix[b0:b0 + 256].astype(np.float32))
        step, off = q4k_grid(raw, w.shape[0], 256)
        for c in range(b0, b0 + 256):
            s, o = step[:, (c - b0) // 32], off[:, (c - b0) // 32]
            out[:, c] = s * np.clip(np.round((w[:, c] - o) / np.where(s == 0, 1, s)), 0, 15) + o
            w[:, c + 1:] -= np.outer((w[:, c] - out[:, c]) / u[c, c], u[c, c + 1:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--layers", default="2,15,27")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "gptq-probe.json")
    a = ap.parse_args()
    t0 = time.time()
    hs, weights = hessians(a.model, [int(x) for x in a.layers.split(",")], a.tokens)
    qz = Quantizer(find_llama_cpp(), "lwq")
    rows = []
    for (layer, kind), h in sorted(hs.items()):
        w = weights[layer, kind]
        imatrix = (np.diag(h) / a.tokens).astype(np.float32)

        def err(q: np.ndarray) -> float:
            e = w - q
            return float(np.einsum("ij,jk,ik->", e, h, e))

        def rtn(ty: str, im) -> float:
            return err(qz.roundtrip(w.astype(np.float32), ty, im).astype(np.float64))

        r = {"tensor": f"blk.{layer}.{kind}.weight", "shape": list(w.shape),
             "q4_k_rtn_plain": rtn("q4_k", None), "q4_k_rtn": rtn("q4_k", imatrix),
             "q4_k_feedback": err(q4k_feedback(qz, w, h, imatrix)),
             "q5_k_rtn": rtn("q5_k", imatrix)}
        r["feedback_ratio"] = r["q4_k_feedback"] / r["q4_k_rtn"]
        rows.append(r)
        print(f"{r['tensor']}: feedback / round-to-nearest {r['feedback_ratio']:.3f}", flush=True)
    head = ("tensor", "shape", "Q4_K RTN, no imatrix", "Q4_K RTN, imatrix", "Q4_K + feedback",
            "ratio", "Q5_K RTN, imatrix")
    cells = [(r["tensor"], "x".join(map(str, r["shape"])), f"{r['q4_k_rtn_plain']:.4g}",
              f"{r['q4_k_rtn']:.4g}", f"{r['q4_k_feedback']:.4g}", f"{r['feedback_ratio']:.3f}",
              f"{r['q5_k_rtn']:.4g}") for r in rows]
    ratios = [r["feedback_ratio"] for r in rows]
    summary = (f"Q4_K with error feedback / Q4_K round-to-nearest (both with the imatrix), layer "
               f"output error: {min(ratios):.3f} to {max(ratios):.3f}, geometric mean "
               f"{float(np.exp(np.mean(np.log(ratios)))):.3f} over {len(rows)} tensors")
    print(table(head, cells))
    print(summary)
    doc = {"model": str(a.model), "tokens": a.tokens, "date": time.strftime("%Y-%m-%d"),
           "machine": machine(), "seconds": round(time.time() - t0),
           "command": "bench/gptq_probe.py " + " ".join(sys.argv[1:]), "summary": summary,
           "rows": rows}
    a.results.write_text(json.dumps(doc, indent=1))
    a.results.with_suffix(".md").write_text(
        f"# Probe: error feedback inside Q4_K\n\nCommand: `{doc['command']}`; {doc['date']}; "
        f"{doc['machine']}; {doc['seconds']} s\n\nLayer output error tr((W-Q) H (W-Q)^T), "
        f"H = X^T X over {a.tokens} calibration tokens.\n\n{markdown_table(head, cells)}\n\n"
        f"{summary}\n")
    print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
