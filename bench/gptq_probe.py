"""Probe: how much layer-output error would error feedback (GPTQ) inside ggml's Q4_K remove?

    .venv/bin/python bench/gptq_probe.py [--model DIR] [--layers 2,15,27] [--tokens 4096]
    .venv/bin/python bench/gptq_probe.py --kld [--chunks 40]    (after bench/quality.py)

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

With --kld, the same in llama.cpp's terms, on every layer: from the F16 GGUF and the imatrix that
bench/quality.py left in out/quality/MODEL/imatrix-auto, llama-quantize writes an all-Q4_K file
(`--pure`, the imatrix; ggml's encoder), then two copies get every linear layer of the repeating
blocks re-encoded in place - by lwq-gguf's encoder (round-to-nearest) and with error feedback on
top of it - and all three are evaluated against F16 (mean KLD, WikiText-2 test). Writes
bench/results/gptq-probe-kld.json and .md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from harness import RESULTS, ROOT, WIKI, parser, write_results

from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.quant.encoder import Quantizer
from lwq_gguf.report import markdown_table, table
from lwq_gguf.score.scores import default_calibration

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
                 damp: float = 0.01) -> tuple[np.ndarray, bytes]:
    """Q4_K of ``w`` with GPTQ error feedback: (dequantized weights, the Q4_K bytes)."""
    w, (rows, n) = w.copy(), w.shape
    u = np.linalg.cholesky(np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(n))).T
    out, q = np.zeros_like(w), np.zeros((rows, n), dtype=np.uint8)
    blocks = []
    for b0 in range(0, n, 256):
        b1 = b0 + 256
        raw = qz.quantize(w[:, b0:b1].astype(np.float32), "q4_k",
                          imatrix[b0:b1].astype(np.float32))
        step, off = q4k_grid(raw, rows, 256)
        err = np.zeros((rows, 256))
        for c in range(b0, b1):  # within the block column by column, beyond it in one product
            s, o = step[:, (c - b0) // 32], off[:, (c - b0) // 32]
            q[:, c] = np.clip(np.round((w[:, c] - o) / np.where(s == 0, 1, s)), 0, 15)
            out[:, c] = s * q[:, c] + o
            err[:, c - b0] = (w[:, c] - out[:, c]) / u[c, c]
            w[:, c + 1:b1] -= np.outer(err[:, c - b0], u[c, c + 1:b1])
        w[:, b1:] -= err @ u[b0:b1, b1:]
        lo = q[:, b0:b1].reshape(rows, 4, 2, 32)  # ggml: qs[32 j + l] = q[64 j + l] | q[64 j + 32 + l] << 4
        packed = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(rows, 128)
        head = np.frombuffer(raw, dtype=np.uint8).reshape(rows, 144)[:, :16]  # d, dmin, scales
        blocks.append(np.concatenate([head, packed], axis=1))
    return out, np.stack(blocks, axis=1).tobytes()


LINEAR_INPUT = {"attn_q": "attn_q", "attn_k": "attn_q", "attn_v": "attn_q",
                "attn_output": "attn_output", "ffn_gate": "ffn_up", "ffn_up": "ffn_up",
                "ffn_down": "ffn_down"}  # the GGUF tensor -> the probed layer with its input


def kld_probe(a) -> None:
    """--kld: llama-quantize's pure Q4_K against lwq-gguf's encoder with and without feedback."""
    import shutil

    from gguf import GGUFReader

    from lwq_gguf.evaluate.perplexity import EvalConfig, evaluate_many
    from lwq_gguf.llamacpp import run_tool
    from lwq_gguf.quant.imatrix import read_imatrix

    t0 = time.time()
    src = ROOT / "out" / "quality" / a.model.resolve().name / "imatrix-auto"
    base = next((src / "gguf").glob("*-F16.gguf"), None)
    if base is None or not (src / "imatrix.gguf").is_file():
        sys.exit(f"gptq_probe: {src} has no F16 GGUF or imatrix: run bench/quality.py first")
    lc, out = find_llama_cpp(), ROOT / "out" / "gptq-probe"
    out.mkdir(parents=True, exist_ok=True)
    files = {k: out / f"q4_k-{k}.gguf" for k in ("ggml", "lwq", "lwq-feedback")}
    run_tool([str(lc.tool("llama-quantize")), "--pure", "--imatrix", str(src / "imatrix.gguf"),
              str(base), str(files["ggml"]), "Q4_K_M"], what="llama-quantize")
    n_layers = sum(1 for t in GGUFReader(str(base)).tensors if t.name.endswith("attn_q.weight"))
    hs, _ = hessians(a.model, list(range(n_layers)), a.tokens)
    imat, qz = read_imatrix(src / "imatrix.gguf"), Quantizer(lc, "lwq")
    f16 = {t.name: t for t in GGUFReader(str(base)).tensors}
    for k in ("lwq", "lwq-feedback"):
        shutil.copyfile(files["ggml"], files[k])
    readers = {k: GGUFReader(str(files[k]), "r+") for k in ("lwq", "lwq-feedback")}
    feedback = {t.name: t for t in readers["lwq-feedback"].tensors}
    done = 0
    for t in readers["lwq"].tensors:
        parts = t.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in LINEAR_INPUT:
            continue
        w = np.asarray(f16[t.name].data, dtype=np.float64)
        im = imat.weights(t.name)
        h = hs[int(parts[1]), LINEAR_INPUT[parts[2]]]
        t.data[...] = np.frombuffer(qz.quantize(w.astype(np.float32), "q4_k", im),
                                    dtype=np.uint8).reshape(t.data.shape)
        deq, raw = q4k_feedback(qz, w, h, im)
        assert np.allclose(qz.dequantize(raw, "q4_k", w.shape), deq, atol=1e-5), t.name
        fb = feedback[t.name]
        fb.data[...] = np.frombuffer(raw, dtype=np.uint8).reshape(fb.data.shape)
        done += 1
    for r in readers.values():
        r.data.flush()
    del readers
    res = evaluate_many(list(files.values()), a.text, lc, EvalConfig(ctx=512, chunks=a.chunks),
                        base=base)
    rows = [{"file": k, "kld": r.kld_mean, "kld_err": r.kld_err, "same_top": r.same_top_pct,
             "ppl": r.ppl, "bytes": files[k].stat().st_size} for k, r in zip(files, res)]
    head = ("Q4_K encoding of the layers", "MiB", "mean KLD", "same top %", "PPL")
    cells = [(r["file"], f"{r['bytes'] / 2**20:.2f}", f"{r['kld']:.4f} ± {r['kld_err']:.4f}",
              f"{r['same_top']:.1f}", f"{r['ppl']:.2f}") for r in rows]
    summary = (f"error feedback / lwq-gguf round-to-nearest, mean KLD: "
               f"{rows[2]['kld'] / rows[1]['kld']:.3f}; / llama-quantize's Q4_K: "
               f"{rows[2]['kld'] / rows[0]['kld']:.3f} ({done} tensors re-encoded)")
    print(table(head, cells))
    print(summary)
    write_results(
        a.results.with_name(a.results.stem + "-kld.json"),
        {"model": str(a.model), "text": str(a.text), "chunks": a.chunks, "tokens": a.tokens,
         "seconds": round(time.time() - t0), "summary": summary, "rows": rows},
        "Probe: error feedback inside Q4_K, in KLD",
        f"{round(time.time() - t0)} s; {a.chunks} x 512 tokens of {a.text.name}; every tensor Q4_K "
        "(llama-quantize --pure with the imatrix), the repeating layers' linear tensors "
        f"re-encoded in place\n\n{markdown_table(head, cells)}\n\n{summary}")

def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--layers", default="2,15,27")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--results", type=Path, default=RESULTS / "gptq-probe.json")
    ap.add_argument("--kld", action="store_true", help="every layer, in llama.cpp: mean KLD")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--text", type=Path, default=WIKI)
    a = ap.parse_args()
    if a.kld:
        return kld_probe(a)
    t0 = time.time()
    hs, weights = hessians(a.model, [int(x) for x in a.layers.split(",")], a.tokens)
    qz = Quantizer(find_llama_cpp(), "lwq")
    rows = []
    for (layer, kind), h in sorted(hs.items()):
        w = weights[layer, kind]
        imatrix = (np.diag(h) / a.tokens).astype(np.float32)

        def err(q: np.ndarray, w=w, h=h) -> float:
            e = w - q
            return float(np.einsum("ij,jk,ik->", e, h, e))

        def rtn(ty: str, im, w=w) -> float:
            return err(qz.roundtrip(w.astype(np.float32), ty, im).astype(np.float64))

        r = {"tensor": f"blk.{layer}.{kind}.weight", "shape": list(w.shape),
             "q4_k_rtn_plain": rtn("q4_k", None), "q4_k_rtn": rtn("q4_k", imatrix),
             "q4_k_feedback": err(q4k_feedback(qz, w, h, imatrix)[0]),
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
    write_results(
        a.results,
        {"model": str(a.model), "tokens": a.tokens, "seconds": round(time.time() - t0),
         "summary": summary, "rows": rows},
        "Probe: error feedback inside Q4_K",
        f"{round(time.time() - t0)} s. Layer output error tr((W-Q) H (W-Q)^T), H = X^T X over "
        f"{a.tokens} calibration tokens.\n\n{markdown_table(head, cells)}\n\n{summary}")

if __name__ == "__main__":
    main()
