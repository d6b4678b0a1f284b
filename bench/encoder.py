"""lwq-gguf's Q4_K encoder against ggml's: error and speed, one thread.

    .venv/bin/python bench/encoder.py

Error: importance-weighted MSE (plain MSE without an imatrix) of the weights llama.cpp computes
with after each encoder, on (a) every 5th layer's q_proj and ffn_down of the demo model
models/smollm2-135m-k256 (weights on a Q4_1 grid: the model is rebuilt from a Q4_1 GGUF) and
(b) Gaussian and Student-t (4) random weights of 8B-like rows (4096 wide), with a random
imatrix for the "imatrix" rows. Speed: millions of weights per second, one call on one thread.
Writes bench/results/encoder.json and encoder.md.
"""

from __future__ import annotations

import time

import numpy as np
from harness import RESULTS, ROOT, write_results

from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.quant.encoder import Quantizer
from lwq_gguf.report import markdown_table, table

MODEL = ROOT / "models" / "smollm2-135m-k256" / "model.safetensors"


def samples(rng) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(MODEL), "np") as f:
        for kind in ("self_attn.q_proj", "mlp.down_proj"):
            out[f"demo {kind.split('.')[1]}"] = np.concatenate(
                [f.get_tensor(f"model.layers.{i}.{kind}.weight") for i in range(0, 30, 5)])
    out["gauss 1024x4096"] = rng.standard_normal((1024, 4096)) * 0.02
    out["t4 1024x4096"] = rng.standard_t(4, (1024, 4096)) * 0.02
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


def main() -> None:
    lc = find_llama_cpp()
    enc = {"lwq": Quantizer(lc, "lwq"), "ggml": Quantizer(lc, "ggml")}
    rng = np.random.default_rng(0)
    rows = []
    for name, w in samples(rng).items():
        for imat in (None, rng.uniform(0.1, 10, w.shape[1]).astype(np.float32)):
            wt = 1.0 if imat is None else imat
            r = {"weights": name, "imatrix": imat is not None, "n": int(w.size)}
            for e, q in enc.items():
                data, sec = timed(lambda q=q, w=w, imat=imat: q.quantize(w, "q4_k", imat))
                y = q.dequantize(data, "q4_k", w.shape)
                r[f"{e}_mse"] = float(np.mean((w - y) ** 2 * wt))
                r[f"{e}_mweights_s"] = w.size / sec / 1e6
            r["mse_ratio"] = r["lwq_mse"] / r["ggml_mse"]
            r["time_ratio"] = r["ggml_mweights_s"] / r["lwq_mweights_s"]
            rows.append(r)
    head = ("weights", "imatrix", "MSE ggml", "MSE lwq", "lwq / ggml", "Mw/s ggml", "Mw/s lwq")
    cells = [(r["weights"], "yes" if r["imatrix"] else "no", f"{r['ggml_mse']:.3e}",
              f"{r['lwq_mse']:.3e}", f"{r['mse_ratio']:.3f}", f"{r['ggml_mweights_s']:.2f}",
              f"{r['lwq_mweights_s']:.2f}") for r in rows]
    print(table(head, cells))
    write_results(RESULTS / "encoder.json", {"rows": rows},
                  "Q4_K encoders: lwq-gguf vs ggml (one thread)", markdown_table(head, cells))


if __name__ == "__main__":
    main()
