"""Scale: peak memory and wall time of `lwq-gguf` against the plain llama.cpp pipeline.

    .venv/bin/python bench/scale.py --shape smollm     # the real 135M demo model (minutes)
    .venv/bin/python bench/scale.py --shape 8b         # random Llama, 8B shapes, bf16 ~16 GB
    .venv/bin/python bench/scale.py --shape olmoe      # random OLMoE-1B-7B shapes, bf16 ~14 GB

Steps, each a child process timed by bench/harness.py (wall time, peak RSS from wait4):
  score    `lwq-gguf score --rescore --calib-tokens N` (LIM, ZD, Fisher sensitivity, imatrix)
  plan     `lwq-gguf plan --avg-bits 4.0 --scores ... --tensor-type-file types.txt`
  plain    `convert_hf_to_gguf.py --outtype <same>` + `llama-quantize --tensor-type-file
           types.txt` with the same per-tensor types (the pipeline lwq-gguf replaces)
  ours     `lwq-gguf convert --plan plan.json --imatrix none --encoder ggml` (convert without
           scoring; the default single-pass writer, and the built-in check; ggml's encoder for
           every type, so the file is llama-quantize's, byte for byte)
  ours_two_step  the same with `--two-step` (converter -> 16-bit GGUF -> llama-quantize)
  ours_lwq the default encoder (lwq-gguf's own Q4_K blocks; not byte-comparable)
and a plain PyTorch forward of one decoder layer over the same tokens (scaled by the layer
count) as the reference for scoring throughput. The 8B- and OLMoE-shaped models are generated
once into $LWQ_CACHE/bench (random normal weights, std 0.02; the demo model's tokenizer; OLMoE:
64 experts, 8 active, 16 layers, so each expert is routed a real share of the tokens). Writes
bench/results/scale-SHAPE.json and prints a table. Targets: peak RSS <= 8 GB and ours / plain
<= 1.1 for the 8B and OLMoE shapes. ``--strategy lim`` plans from LIM scores alone (no
sensitivity analysis, which takes over an hour at 8B shapes on 2 cores). ``--steps`` runs some
of the steps and merges them into the existing results (score+plan once, the conversions later
on an idle machine): every step carries the date it was measured, and the results list which
steps were measured in this run (``steps_run_now``) and which were carried over from an earlier
run (``steps_carried``); the single-pass file is compared byte for byte with the plain
pipeline's when both ran.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from harness import RESULTS, ROOT, parser, run_child, today, write_results

from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.report import markdown_table, table

SHAPES = {"8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                     vocab_size=128256, num_attention_heads=32, num_key_value_heads=8),
          "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                     vocab_size=128256, num_attention_heads=32, num_key_value_heads=8),
          # allenai/OLMoE-1B-7B-0924's shapes (6.9B parameters, 1.3B active)
          "olmoe": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=1024,
                        vocab_size=50304, num_attention_heads=16, num_key_value_heads=16,
                        num_experts=64, num_experts_per_tok=8)}
CACHE = Path(os.environ.get("LWQ_CACHE", Path.home() / ".cache" / "lwq-gguf")) / "bench"


def generate(shape: str) -> Path:
    """A random bf16 Llama (or OLMoE) with these shapes, written shard by shard (~2 GB each),
    once."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, OlmoeConfig

    moe = shape == "olmoe"
    out = CACHE / f"{'olmoe' if moe else 'llama-' + shape}-shape"
    if (out / ".done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    common = dict(max_position_embeddings=4096 if moe else 8192, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    conf = (OlmoeConfig(**SHAPES[shape], **common) if moe else
            LlamaConfig(**SHAPES[shape], rope_theta=500000.0, **common))
    conf.architectures = ["OlmoeForCausalLM" if moe else "LlamaForCausalLM"]
    conf.save_pretrained(out)
    h, f, v = conf.hidden_size, conf.intermediate_size, conf.vocab_size
    kv = h // conf.num_attention_heads * conf.num_key_value_heads
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(conf.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
        if not moe:
            shapes.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                           p + "mlp.down_proj.weight": (h, f)})
            continue
        shapes.update({p + "self_attn.q_norm.weight": (h,), p + "self_attn.k_norm.weight": (kv,),
                       p + "mlp.gate.weight": (conf.num_experts, h)})
        for e in range(conf.num_experts):
            q = f"{p}mlp.experts.{e}."
            shapes.update({q + "gate_proj.weight": (f, h), q + "up_proj.weight": (f, h),
                           q + "down_proj.weight": (h, f)})
    gen = torch.Generator().manual_seed(0)
    shards, cur, size = [], {}, 0
    for name, s in shapes.items():
        cur[name] = s
        size += 2 * int(torch.tensor(s).prod())
        if size > 2 << 30:
            shards.append(cur)
            cur, size = {}, 0
    shards.append(cur) if cur else None
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02)
                   .to(torch.bfloat16) for n, s in names.items()}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for t in (ROOT / "models" / "smollm2-135m").iterdir():
        if t.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(t, out / t.name)
    (out / ".done").write_text("")
    return out


STEPS = ("score", "plan", "plain", "ours", "ours_two_step", "ours_lwq")


def tensor_data_equal(a: Path, b: Path) -> bool:
    """Same tensors (names, types, shapes, bytes) in two GGUF files; metadata may differ (ours
    carries lwq.* keys and the plain pipeline general.name from its own metadata)."""
    import hashlib

    import gguf

    def digest(p: Path) -> dict:
        return {t.name: (t.tensor_type, tuple(t.shape), hashlib.sha256(t.data).hexdigest())
                for t in gguf.GGUFReader(p).tensors}
    return digest(a) == digest(b)


def timed(cmd: list, env: dict | None = None) -> dict:
    """Wall seconds and peak RSS (GB) of one child."""
    return run_child(cmd, env, "scale")


def layer_forward_seconds(model_dir: Path, tokens: int, device: str = "cpu") -> float:
    """A plain PyTorch forward of one decoder layer over ``tokens`` (windows of 512), fp32."""
    import torch

    from lwq_gguf.model.load import open_model
    from lwq_gguf.model.stream import LayerStream

    s = LayerStream(open_model(model_dir), device, 512)
    layer = s.load(s.layers[0], "model.layers.0")
    h = torch.randn(1, 512, s.lm.config.hidden_size, device=device) * 0.02
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        s.run_layer(layer, h)  # warm-up
        sync()
        t0 = time.time()
        for _ in range(max(1, tokens // 512)):
            s.run_layer(layer, h)
        sync()
    return time.time() - t0


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--shape", choices=["smollm", *SHAPES], default="smollm")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--avg-bits", type=float, default=4.0)
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "scale")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"some of {','.join(STEPS)}")
    ap.add_argument("--strategy", default="auto", choices=["auto", "lim", "zd"],
                    help="plan strategy; lim/zd score without the sensitivity analysis (the 8B "
                         "shape's takes over an hour on 2 cores)")
    a = ap.parse_args()
    steps = [s for s in a.steps.split(",") if s]
    if set(steps) - set(STEPS):
        raise SystemExit(f"scale: --steps: use some of {','.join(STEPS)}")
    model = ROOT / "models" / "smollm2-135m-k256" if a.shape == "smollm" else generate(a.shape)
    work = a.work / a.shape
    res = RESULTS / f"scale-{a.shape}.json"
    old = json.loads(res.read_text()) if res.is_file() else {}
    types_file = work / "types.txt"
    old_types = types_file.read_text() if types_file.is_file() else None
    if "score" in steps:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    lc = find_llama_cpp()
    cli = [sys.executable, "-m", "lwq_gguf", "-q"]
    env = {"LWQ_SCORES_CACHE": str(work / "score-cache")}
    conf = json.loads((model / "config.json").read_text())
    bf16 = "bfloat16" in (conf.get("torch_dtype"), conf.get("dtype"))  # as --outtype auto decides
    outtype = "bf16" if bf16 else "f16"
    r = dict(old.get("steps", {}))
    if "score" in steps:
        r["score"] = timed([*cli, "score", str(model), "-o", str(work / "scores.json"),
                            "--rescore", "--calib-tokens", str(a.calib_tokens), "--device", "cpu",
                            *([] if a.strategy == "auto" else ["--no-sensitivity"])], env)
    if "plan" in steps:
        r["plan"] = timed([*cli, "plan", str(model), "--avg-bits", str(a.avg_bits), "--imatrix",
                           "none", "--strategy", a.strategy, "--scores", str(work / "scores.json"),
                           "-o", str(work / "plan.json"), "--tensor-type-file",
                           str(work / "types.txt"),
                           "--force"], env)
    if "plan" in steps and old_types not in (None, types_file.read_text()):
        print("scale: the plan's types changed: earlier conversion timings dropped")
        for k in ("plain_convert", "plain_quantize", "ours", "ours_two_step", "ours_lwq"):
            r.pop(k, None)
        old.pop("tensor_data_equal_to_plain", None)
    if "plain" in steps:
        r["plain_convert"] = timed([sys.executable, str(lc.src / "convert_hf_to_gguf.py"),
                                    str(model), "--outtype", outtype, "--outfile",
                                    str(work / "base.gguf")])
        r["plain_quantize"] = timed([str(lc.tool("llama-quantize")), "--tensor-type-file",
                                     str(work / "types.txt"), str(work / "base.gguf"),
                                     str(work / "plain.gguf"), "Q8_0"],
                                    {"LD_LIBRARY_PATH": str(lc.bin)})
        (work / "base.gguf").unlink()
    for step, extra in (("ours", ["--encoder", "ggml"]),  # llama-quantize's bytes, comparable
                        ("ours_two_step", ["--two-step", "--encoder", "ggml"]),
                        ("ours_lwq", [])):  # the default: lwq-gguf's own Q4_K encoder
        if step in steps:
            (work / f"{step}.gguf").unlink(missing_ok=True)
            r[step] = timed([*cli, "convert", str(model), "--plan", str(work / "plan.json"),
                             "--imatrix", "none", "-o", str(work / f"{step}.gguf"), *extra], env)
    for step in steps:
        if step in r:
            r[step]["measured"] = today()
    for step in set(r) - set(steps):
        r[step].setdefault("measured", "an earlier run (undated)")
    same = {}
    for step in ("ours", "ours_two_step"):
        if (work / f"{step}.gguf").is_file() and (work / "plain.gguf").is_file():
            same[step] = tensor_data_equal(work / f"{step}.gguf", work / "plain.gguf")
    sens = json.loads((work / "scores.json").read_text()).get("sensitivity") or {"seconds": 0.0}
    n_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    fwd_carried = bool(old.get("plain_forward_seconds")) and "score" not in steps
    fwd = (old["plain_forward_seconds"] if fwd_carried
           else layer_forward_seconds(model, a.calib_tokens) * n_layers)
    plain = (r["plain_convert"]["seconds"] + r["plain_quantize"]["seconds"]
             if "plain_convert" in r else None)

    def ratio(step: str) -> float | None:
        return round(r[step]["seconds"] / plain, 3) if plain and step in r else None

    doc = {"shape": a.shape, "model": str(model), "calib_tokens": a.calib_tokens,
           "avg_bits": a.avg_bits, "strategy": a.strategy, "outtype": outtype,
           "steps_run_now": [k for k in steps if k in r],
           "steps_carried": sorted(set(r) - set(steps)), "steps": r,
           "convert_ratio": ratio("ours"), "convert_ratio_two_step": ratio("ours_two_step"),
           "convert_ratio_lwq_encoder": ratio("ours_lwq"),
           "tensor_data_equal_to_plain": same or old.get("tensor_data_equal_to_plain"),
           "peak_rss_gb": max(s["peak_rss_gb"] for k, s in r.items() if not k.startswith("plain")),
           "sensitivity_seconds": sens["seconds"],
           "scoring_tokens_per_s": round(a.calib_tokens / r["score"]["seconds"], 1),
           "scoring_without_sensitivity_tokens_per_s":
               round(a.calib_tokens / (r["score"]["seconds"] - sens["seconds"]), 1),
           "plain_forward_seconds": round(fwd, 1), "plain_forward_carried": fwd_carried,
           "plain_forward_tokens_per_s": round(a.calib_tokens / fwd, 1)}
    rows = [(k, f"{s['seconds']:.1f}", f"{s['peak_rss_gb']:.2f}", s["measured"])
            for k, s in r.items()]
    head = ("step", "seconds", "peak RSS GB", "measured")
    print(table(head, rows))
    summary = (f"convert without scoring / plain convert+quantize = {doc['convert_ratio']} single "
               f"pass, {doc['convert_ratio_two_step']} two-step (target <= 1.1), "
               f"{doc['convert_ratio_lwq_encoder']} with the lwq Q4_K encoder; same tensors as "
               f"plain: {doc['tensor_data_equal_to_plain']}; peak RSS of lwq-gguf steps "
               f"{doc['peak_rss_gb']:.2f} GB (target <= 8); scoring "
               f"{doc['scoring_tokens_per_s']} tokens/s vs plain forward "
               f"{doc['plain_forward_tokens_per_s']} tokens/s")
    print(summary)
    write_results(res, doc, f"Scale: the {a.shape} shape",
                  f"{markdown_table(head, rows)}\n\n{summary}")


if __name__ == "__main__":
    main()
