"""The argument parser of every command (what the user can say; :mod:`lwq_gguf.cli.commands`
turns it into configs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lwq_gguf import __version__
from lwq_gguf.plan.plan import STRATEGIES
from lwq_gguf.quant.types import (DEFAULT_BASELINES, DEFAULT_ENCODER, DEFAULT_LADDER, ENCODERS,
                                  IQ_BASELINES)

EPILOG = "Types are llama.cpp's names (iq1_m ... q8_0, f16). BPW = tensor bytes * 8 / tensor elements."
EX_BUG = 70  # an internal error (sysexits EX_SOFTWARE)


def _common(p: argparse.ArgumentParser, top: bool) -> None:
    """-q and --debug, accepted before or after the subcommand."""
    default: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}  # the subcommand's never overrides
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars", **default)
    p.add_argument("--debug", action="store_true", help="show the traceback of an internal "
                   "error (also LWQ_DEBUG=1)", **default)


def _score_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring")
    g.add_argument("--calib", type=Path, help="calibration text (default: packaged WikiText-2 "
                   "validation excerpt)")
    g.add_argument("--calib-tokens", type=int, default=4096, help="tokens of it to use (4096)")
    g.add_argument("--fisher-tokens", type=int, default=1024, help="of those, how many the "
                   "Fisher (a backward pass) is taken over, in windows spread over the text (1024)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="PyTorch device for scoring (auto: cuda when available)")
    g.add_argument("--score-precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="the scoring pass's matmuls (auto: bf16 where the device multiplies it "
                   "natively - a CUDA GPU, a CPU with AVX512-BF16 or AMX - else fp32)")
    g.add_argument("--device-map", default="none", choices=["none", "auto"],
                   help="auto: keep as many layers as fit resident on all visible GPUs (placed "
                   "by accelerate), streaming the rest; none (default): stream every layer")
    g.add_argument("--scores", type=Path, help="reuse a scores JSON from `lwq-gguf score`")
    g.add_argument("--rescore", action="store_true", help="measure the scores again instead of "
                   "reusing the score cache (~/.cache/lwq-gguf/scores, $LWQ_SCORES_CACHE)")


def _plan_args(p: argparse.ArgumentParser, required: bool, several: bool = False,
               sizes: bool = False) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--avg-bits", type=float, required=required, nargs="+", metavar="B",
                   help="target BPW of the whole file (llama.cpp's BPW, embeddings included)"
                   + ("; several targets allowed" if several else ""))
    if sizes:
        g.add_argument("--size", nargs="+", metavar="SIZE", help="instead of --avg-bits: the "
                       "whole file at or below SIZE on disk and within 0.5%% of it (4.2GiB, "
                       "4.5GB, 3900MiB)" + ("; several: a family" if several else ""))
    g.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="auto (default): least expected KLD for the size (measured sensitivity, "
                   "knapsack); lim, zd, random: the paper's two-level layer ranking")
    g.add_argument("--imatrix", default="auto", metavar="auto|none|FILE",
                   help="importance matrix for planning and llama-quantize: auto (default: "
                   "computed from the calibration text), none, or a llama-imatrix .gguf file")
    g.add_argument("--ladder", help="types to choose from, comma-separated, or a preset: "
                   "default (for --strategy auto: every type llama-quantize writes but the "
                   "ternary TQ1_0/TQ2_0 and Q1_0/Q2_0, whose estimate is not trusted; those "
                   "that need an imatrix only with one), all (also Q1_0, Q2_0), k (K-quants "
                   f"and q8_0: {','.join(DEFAULT_LADDER)}, the default of the other strategies)")
    g.add_argument("--seed", type=int, default=0, help="seed of --strategy random")
    g.add_argument("--token-embedding-type", default="auto",
                   help="type of token_embd.weight, or auto: planned first (default auto)")
    g.add_argument("--output-tensor-type", default="auto",
                   help="type of output.weight, or auto: planned first (default auto)")
    g.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="fix matching tensors to TYPE, as llama-quantize does (repeatable)")
    g.add_argument("--dense-size", metavar="SIZE",
                   help="mixture-of-experts: at most SIZE (e.g. 3.5GiB) for every tensor but the "
                   "routed experts (attention, shared experts, router, norms, embeddings, output: "
                   "what stays on the GPU with -ot exps=CPU); the experts take the rest")
    g.add_argument("--dense-bits", type=float, metavar="B",
                   help="the same limit as bits per weight over those tensors")
    g.add_argument("--encoder", choices=ENCODERS,
                   help=f"{DEFAULT_ENCODER} (default; with --plan: the plan's): lwq-gguf's own Q4_K "
                   "encoder (same format, lower error), ggml's for the other types; ggml: "
                   "llama-quantize's bytes")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lwq-gguf", epilog=EPILOG,
                                 description="Layer-wise mixed-precision GGUF quantization.")
    ap.add_argument("--version", action="version", version=f"lwq-gguf {__version__}")
    _common(ap, top=True)
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="measure LIM and ZD per decoder layer", epilog=EPILOG)
    _common(s, top=False)
    s.add_argument("model", type=Path, help="Hugging Face model folder")
    s.add_argument("-o", "--output", type=Path, help="scores JSON (default MODELNAME.scores.json)")
    s.add_argument("--png", type=Path, help="chart (default: the JSON path with .png)")
    s.add_argument("--force", action="store_true", help="replace existing outputs")
    s.add_argument("--no-sensitivity", action="store_true", help="LIM and ZD only (the paper's "
                   "strategies); skip the sensitivity analysis and imatrix of --strategy auto")
    s.add_argument("--ladder", help="types to measure, comma-separated, or a preset: default "
                   "(the default), all (also Q1_0, Q2_0), k (K-quants and q8_0; converts that "
                   "reuse these scores need a ladder within it)")
    _score_args(s)

    p = sub.add_parser("plan", help="choose a type for every tensor", epilog=EPILOG)
    _common(p, top=False)
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", type=Path, help="plan JSON (default: print the tables only)")
    p.add_argument("--tensor-type-file", type=Path, help="also export for llama-quantize")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    _plan_args(p, required=False, sizes=True)
    _score_args(p)

    c = sub.add_parser("convert", help="HF folder -> layer-wise mixed-precision GGUF", epilog=EPILOG)
    _common(c, top=False)
    c.add_argument("model", type=Path)
    c.add_argument("-o", "--output", required=True, help="the GGUF to write; with "
                   "several targets (a family) or an existing folder, the folder to write "
                   "MODEL-lwq-3.5bpw.gguf ... into")
    c.add_argument("--plan", type=Path, help="use this plan JSON instead of planning")
    c.add_argument("--recipe", type=Path, metavar="OTHER.gguf", help="take every tensor's type "
                   "from another GGUF of the same architecture and shapes (e.g. the base "
                   "model's published quant) instead of planning")
    c.add_argument("--outtype", default="auto", choices=["auto", "f16", "bf16", "f32"],
                   help="precision the converter hands to the quantizer (auto: bf16 for bf16 "
                   "models, else f16)")
    c.add_argument("--two-step", action="store_true", help="write the 16-bit GGUF, then run "
                   "llama-quantize on it (needs its size again on disk and --encoder ggml; same bytes "
                   "as the single pass with --encoder ggml)")
    c.add_argument("--force", action="store_true", help="replace an existing output")
    c.add_argument("--no-verify", action="store_true", help="skip the read-back and llama.cpp check")
    c.add_argument("--no-mix-guard", action="store_true", help="write the plan even where one of "
                   "llama.cpp's own mixes fits the same budget and is estimated (or, when close, "
                   "measured on the calibration text) better; by default that mix is written")
    c.add_argument("--threads", type=int, default=0, help="quantizer threads (default: all cores)")
    c.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile (TEMPLATE, "
                   "SYSTEM and stop tokens from the chat template) beside the GGUF")
    c.add_argument("--modelfile", type=Path, help="where --ollama writes it (default: Modelfile "
                   "in the output's folder; a family: FILE.Modelfile beside each file)")
    g = c.add_argument_group("families and model cards")
    g.add_argument("--card", action="store_true", help="write the model card OUTPUT/README.md "
                   "(the default for a family: several targets, or -o FOLDER/)")
    g.add_argument("--no-card", action="store_true", help="a family without the card")
    g.add_argument("--eval", type=Path, metavar="TEXT", help="measure the files against the "
                   "16-bit model beside --baselines (mean KLD, same top, PPL) on TEXT, for the "
                   "card; the 16-bit base and the mixes go to OUTPUT-eval/ (reused)")
    g.add_argument("--baselines", help="with --eval: llama-quantize mixes to measure (default "
                   f"{','.join(DEFAULT_BASELINES)}, and with an imatrix also "
                   f"{','.join(IQ_BASELINES)}; none)")
    g.add_argument("--ctx", type=int, default=512, help="with --eval: tokens per chunk (512)")
    g.add_argument("--chunks", type=int, help="with --eval: first N chunks (default: all)")
    _plan_args(c, required=False, several=True, sizes=True)
    _score_args(c)

    e = sub.add_parser("eval", help="perplexity and KL-divergence in llama.cpp "
                       "(llama-perplexity's protocol)", epilog=EPILOG)
    _common(e, top=False)
    e.add_argument("quant", type=Path, help="the GGUF to measure")
    e.add_argument("--base", type=Path, help="the 16-bit GGUF to compare against (adds KLD)")
    e.add_argument("--text", type=Path, required=True, help="evaluation text, e.g. wiki.test.raw")
    e.add_argument("--ctx", type=int, default=512, help="tokens per chunk (512)")
    e.add_argument("--chunks", type=int, help="first N chunks (default: all)")
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="llama.cpp backend (cuda: all layers offloaded)")
    e.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    m = sub.add_parser("compare", help="layer-wise files vs llama.cpp's mixes: PPL and KLD "
                       "against the 16-bit model, table and plot", epilog=EPILOG)
    _common(m, top=False)
    m.add_argument("model", type=Path, help="Hugging Face model folder")
    m.add_argument("--text", type=Path, required=True, help="evaluation text, e.g. wiki.test.raw")
    m.add_argument("-o", "--output", type=Path, help="output folder (default compare-MODELNAME); "
                   "files and results in it are reused")
    m.add_argument("--baselines",
                   help=f"llama-quantize mixes (default {','.join(DEFAULT_BASELINES)}, and with an "
                   f"imatrix also {','.join(IQ_BASELINES)}; none)")
    m.add_argument("--ctx", type=int, default=512, help="tokens per chunk (512)")
    m.add_argument("--chunks", type=int, help="first N chunks (default: all)")
    m.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    _plan_args(m, required=False, several=True)
    _score_args(m)

    i = sub.add_parser("inspect", help="what is inside any GGUF: size, BPW, the type of every "
                       "tensor per layer; with two files, how their recipes differ", epilog=EPILOG)
    _common(i, top=False)
    i.add_argument("files", type=Path, nargs="+", metavar="FILE.gguf", help="one or two GGUF files")
    i.add_argument("--png", type=Path, help="also draw the layer x tensor-kind type map")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument("--force", action="store_true", help="replace an existing --png")
    return ap
