"""The command line: ``lwq-gguf score | plan | convert | eval | compare``.

Thin: argparse, then the user's intent built once into frozen configs (:class:`Job`,
:class:`PlanConfig`, :class:`ScoreConfig`, :class:`ImatrixChoice`, ...), one call into the
pipeline, a printed summary. Every user error ends in one ``lwq-gguf: error:`` line and a
non-zero exit; an unexpected one in one line saying it is a bug (traceback with ``--debug`` or
``LWQ_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from lwq_gguf import __version__
from lwq_gguf.errors import LwqError
from lwq_gguf.plan.budget import parse_size
from lwq_gguf.plan.plan import STRATEGIES, PlanConfig, parse_override
from lwq_gguf.quant.types import (DEFAULT_BASELINES, DEFAULT_ENCODER, DEFAULT_LADDER, ENCODERS,
                                  IQ_BASELINES, parse_ladder)

EPILOG = "Types are llama.cpp's names (iq1_m ... q8_0, f16). BPW = tensor bytes * 8 / tensor elements."
EX_BUG = 70  # an internal error (sysexits EX_SOFTWARE)


def _common(p: argparse.ArgumentParser, top: bool) -> None:
    """-q and --debug, accepted before or after the subcommand."""
    default = {} if top else {"default": argparse.SUPPRESS}  # the subcommand's never overrides
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
    g.add_argument("--device-map", default="none", choices=["none", "auto"],
                   help="auto: keep as many layers as fit resident on all visible GPUs (placed "
                   "by accelerate), streaming the rest; none (default): stream every layer")
    g.add_argument("--scores", type=Path, help="reuse a scores JSON from `lwq-gguf score`")
    g.add_argument("--rescore", action="store_true", help="measure the scores again instead of "
                   "reusing the score cache (~/.cache/lwq-gguf/scores, $LWQ_SCORES_CACHE)")


def _plan_args(p: argparse.ArgumentParser, required: bool, several: bool = False) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--avg-bits", type=float, required=required, nargs="+", metavar="B",
                   help="target BPW of the whole file (llama.cpp's BPW, embeddings included)"
                   + ("; several targets allowed" if several else ""))
    g.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="auto (default): least expected KLD for the size (measured sensitivity, "
                   "knapsack); lim, zd, random: the paper's two-level layer ranking")
    g.add_argument("--imatrix", default="auto", metavar="auto|none|FILE",
                   help="importance matrix for planning and llama-quantize: auto (default: "
                   "computed from the calibration text), none, or a llama-imatrix .gguf file")
    g.add_argument("--ladder", help="types to choose from, comma-separated, or a preset: all "
                   "(default for --strategy auto: every type llama-quantize writes but the "
                   "ternary TQ1_0/TQ2_0; those that need an imatrix only with one), k (K-quants "
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
    s.add_argument("--ladder", help="types to measure, comma-separated, or a preset: all "
                   "(default), k (K-quants and q8_0; converts that reuse these scores need a "
                   "ladder within it)")
    _score_args(s)

    p = sub.add_parser("plan", help="choose a type for every tensor", epilog=EPILOG)
    _common(p, top=False)
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", type=Path, help="plan JSON (default: print the tables only)")
    p.add_argument("--tensor-type-file", type=Path, help="also export for llama-quantize")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    _plan_args(p, required=True)
    _score_args(p)

    c = sub.add_parser("convert", help="HF folder -> layer-wise mixed-precision GGUF", epilog=EPILOG)
    _common(c, top=False)
    c.add_argument("model", type=Path)
    c.add_argument("-o", "--output", type=Path, required=True, help="the GGUF to write")
    c.add_argument("--plan", type=Path, help="use this plan JSON instead of planning")
    c.add_argument("--outtype", default="auto", choices=["auto", "f16", "bf16", "f32"],
                   help="precision the converter hands to the quantizer (auto: bf16 for bf16 "
                   "models, else f16)")
    c.add_argument("--two-step", action="store_true", help="write the 16-bit GGUF, then run "
                   "llama-quantize on it (needs its size again on disk and --encoder ggml; same bytes "
                   "as the single pass with --encoder ggml)")
    c.add_argument("--force", action="store_true", help="replace an existing output")
    c.add_argument("--no-verify", action="store_true", help="skip the read-back and llama.cpp check")
    c.add_argument("--threads", type=int, default=0, help="quantizer threads (default: all cores)")
    c.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile (TEMPLATE, "
                   "SYSTEM and stop tokens from the chat template) beside the GGUF")
    c.add_argument("--modelfile", type=Path, help="where --ollama writes it (default: Modelfile "
                   "in the output's folder)")
    _plan_args(c, required=False)
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
    return ap


# ---- intent: the parsed arguments as frozen configs, built once -------------------------------

def _score_config(a):
    from lwq_gguf.score.scores import ScoreConfig

    if a.device_map == "auto" and a.device == "cpu":
        raise LwqError("--device-map auto places the model on the GPUs: drop --device cpu")
    return ScoreConfig(calib=a.calib, calib_tokens=a.calib_tokens,
                       fisher_tokens=a.fisher_tokens, device=a.device,
                       device_map=a.device_map, rescore=a.rescore)


def _one_target(a) -> float | None:
    if a.avg_bits is not None and len(a.avg_bits) != 1:
        raise LwqError(f"{a.command} takes one --avg-bits (got {len(a.avg_bits)}): use "
                       "`lwq-gguf compare` for several targets")
    return a.avg_bits[0] if a.avg_bits else None


def _plan_config(a, bits: float) -> PlanConfig:
    return PlanConfig(avg_bits=bits, ladder=tuple(a.ladder.split(",")) if a.ladder else (),
                      strategy=a.strategy, seed=a.seed,
                      token_embedding_type=a.token_embedding_type.lower(),
                      output_tensor_type=a.output_tensor_type.lower(),
                      overrides=tuple(parse_override(s) for s in a.tensor_type),
                      encoder=a.encoder or DEFAULT_ENCODER,
                      dense_bytes=parse_size(a.dense_size) if a.dense_size else None,
                      dense_bits=a.dense_bits)


def _job(a, **kw):
    from lwq_gguf.pipeline import Job
    from lwq_gguf.quant.imatrix import ImatrixChoice

    imatrix = ImatrixChoice.parse(getattr(a, "imatrix", "auto"))
    return Job(model=a.model, score=_score_config(a), imatrix=imatrix, scores_file=a.scores,
               progress=not a.quiet, **kw)


# ---- the commands ------------------------------------------------------------------------------

def cmd_score(a) -> None:
    from lwq_gguf.files import atomic_write_text, check_output
    from lwq_gguf.pipeline import prepare
    from lwq_gguf.quant.imatrix import imatrix_from_dict, write_imatrix
    from lwq_gguf.report import table
    from lwq_gguf.score.layers import plot_scores

    out = a.output or Path(f"{a.model.resolve().name}.scores.json")
    png = a.png or out.with_suffix(".png")
    imatrix = out.with_name(out.name.removesuffix(".json").removesuffix(".scores") + ".imatrix.gguf")
    for path in (out, png) + (() if a.no_sensitivity else (imatrix,)):
        check_output(path, a.force)
    if a.scores:
        raise LwqError("score measures the scores: drop --scores")
    ladder = {"ladder": parse_ladder(a.ladder)} if a.ladder else {}
    scores = prepare(_job(a, measure=() if a.no_sensitivity else ("auto",), **ladder)).scores
    atomic_write_text(out, scores.to_json(), a.force)
    if scores.imatrix:
        write_imatrix(imatrix_from_dict(scores.imatrix), imatrix)
    plot_scores(scores, png, f"{a.model.name}: layer importance")
    lim = scores.lim or (0.0,) * scores.n_layers  # (): no forward pass of this architecture
    order = sorted(range(scores.n_layers), key=lambda i: -lim[i])
    rank = {layer: i + 1 for i, layer in enumerate(order)}
    print(table(("layer", "LIM", "LIM rank", "ZD"),
                [(i, f"{scores.lim[i]:.4f}" if scores.lim else "-", rank[i] if scores.lim else "-",
                  f"{scores.zd[i]:.4f}") for i in range(scores.n_layers)]))
    sens = scores.sensitivity
    if sens:
        keys = " and ".join(k.rpartition("@")[0] for k in sens["damage"])
        print(f"sensitivity ({sens.get('basis', 'expected KLD')}) of "
              f"{len(next(iter(sens['damage'].values())))} tensors x {len(sens['ladder'])} types "
              f"(imatrix {keys}) in {sens['seconds']:.0f} s"
              + (f"; imatrix written to {imatrix} (llama-quantize --imatrix)"
                 if scores.imatrix else ""))
        if sens.get("phases"):
            print("time (s): " + ", ".join(f"{k} {v:g}" for k, v in sens["phases"].items())
                  + " (sweeps: CPU seconds over the worker threads)")
    print(f"{scores.calib_tokens} calibration tokens on {scores.device}; wrote {out} and {png}")


def cmd_plan(a) -> None:
    from lwq_gguf.files import atomic_write_text, check_output
    from lwq_gguf.pipeline import prepare
    from lwq_gguf.report import plan_layers_table, plan_summary, plan_types_table

    job = _job(a, plan=_plan_config(a, _one_target(a)))
    for path in (a.output, a.tensor_type_file):
        if path:
            check_output(path, a.force)
    p = prepare(job)
    print(plan_layers_table(p.plan, p.scores.lim if p.scores else None))
    print(plan_types_table(p.plan))
    print(plan_summary(p.plan))
    if a.output:
        atomic_write_text(a.output, p.plan.to_json(), a.force)
        print(f"wrote {a.output}")
    if a.tensor_type_file:
        atomic_write_text(a.tensor_type_file, p.plan.tensor_type_file(), a.force)
        print(f"wrote {a.tensor_type_file} (llama-quantize --tensor-type-file)")


def cmd_convert(a) -> None:
    from lwq_gguf.evaluate.perplexity import check_perplexity
    from lwq_gguf.files import atomic_write_text, check_output
    from lwq_gguf.pipeline import convert
    from lwq_gguf.report import plan_summary, plan_types_table
    from lwq_gguf.write.writer import WriteConfig

    bits = _one_target(a)
    if a.plan is None and bits is None:
        raise LwqError("convert needs --avg-bits B (or --plan PLAN.json)")
    if a.plan is not None:
        job = _job(a, plan_file=a.plan, encoder=a.encoder)
    else:
        job = _job(a, plan=_plan_config(a, bits))
    write = WriteConfig(output=a.output, outtype=a.outtype, force=a.force, threads=a.threads,
                        two_step=a.two_step)
    modelfile = a.modelfile or (a.output.parent / "Modelfile" if a.ollama else None)
    if modelfile is not None:
        check_output(modelfile, a.force)
    r = convert(job, write, verify=not a.no_verify, perplexity=check_perplexity)
    print(plan_types_table(r.plan))
    print(plan_summary(r.plan))
    check = f"llama.cpp check PPL {r.check.ppl:.2f} (4x128 tokens, CPU)" if r.check.ppl else "no check"
    size = r.output.stat().st_size / 2**20
    print(f"wrote {r.output}: {size:.1f} MiB, {r.check.bpw:.3f} BPW read back; {check}; "
          f"{r.seconds:.0f} s")
    if modelfile is not None:
        from lwq_gguf.write.ollama import modelfile_text

        text, notes = modelfile_text(r.output, a.model, modelfile)
        atomic_write_text(modelfile, text, a.force)
        for note in notes:
            print(f"note: {note}")
        print(f"wrote {modelfile}: ollama create NAME -f {modelfile}")


def _eval_config(a):
    from lwq_gguf.evaluate.perplexity import EvalConfig

    if a.ctx < 16 or (a.chunks is not None and a.chunks < 1):
        raise LwqError("--ctx must be at least 16 and --chunks at least 1")
    return EvalConfig(ctx=a.ctx, chunks=a.chunks, device=a.device, threads=a.threads)


def cmd_eval(a) -> None:
    import json

    from lwq_gguf.evaluate.perplexity import evaluate
    from lwq_gguf.llamacpp import find_llama_cpp
    from lwq_gguf.report import table

    r = evaluate(a.quant, a.text, find_llama_cpp(), _eval_config(a), a.base,
                 progress=not (a.quiet or a.json))
    if a.json:
        print(json.dumps(r.to_dict()))
        return
    rows = [("PPL", f"{r.ppl:.4f} ± {r.ppl_err:.4f}")]
    if r.kld_mean is not None:
        rows += [("PPL ratio (quant/base)", f"{r.ppl_ratio:.4f}"),
                 ("mean KLD", f"{r.kld_mean:.6f} ± {r.kld_err:.6f}"),
                 ("99th pct KLD", f"{r.kld_p99:.6f}"), ("same top token", f"{r.same_top_pct:.2f}%")]
    print(table(("metric", "value"), rows))
    print(f"{r.chunks} chunks x {a.ctx} tokens, {r.tokens_scored} scored, llama.cpp on {r.device}")


def cmd_compare(a) -> None:
    import shlex

    from lwq_gguf.evaluate.compare import CompareConfig, run_compare, write_outputs
    from lwq_gguf.quant.imatrix import ImatrixChoice
    from lwq_gguf.quant.types import default_baselines, parse_mixes
    from lwq_gguf.report import COMPARE_HEADERS, compare_rows, table

    if a.scores:
        raise LwqError("compare scores the model once itself (OUT/scores.json): drop --scores")
    targets = tuple(dict.fromkeys(a.avg_bits or ()))
    imatrix = ImatrixChoice.parse(a.imatrix)
    cfg = CompareConfig(model=a.model, out_dir=a.output or Path(f"compare-{a.model.resolve().name}"),
                        text=a.text, targets=targets,
                        plan=_plan_config(a, targets[0] if targets else 4.0),
                        baselines=parse_mixes(a.baselines) if a.baselines is not None
                        else default_baselines(imatrix.mode != "none"), imatrix=imatrix,
                        score=_score_config(a), eval=_eval_config(a), threads=a.threads)
    res = run_compare(cfg, progress=not a.quiet)
    paths = write_outputs(cfg, res, "lwq-gguf " + shlex.join(a.argv))
    print(table(COMPARE_HEADERS, compare_rows(res.rows)))
    print(f"{res.base.result.chunks} chunks x {a.ctx} tokens on {res.device}; {res.built} file(s) "
          f"built, {res.evaluated} evaluated, {len(res.rows) - res.evaluated} from cache; "
          f"{res.seconds:.0f} s")
    print("wrote " + ", ".join(str(p) for p in paths))


# ---- the error contract ------------------------------------------------------------------------

def _os_error_line(e: OSError) -> str:
    """One line for an OSError that escaped the stages: disk full only for a disk-full cause."""
    from lwq_gguf.files import disk_full, is_disk_full

    where = Path(e.filename) if e.filename else Path("a file")
    if is_disk_full(e):
        return str(disk_full(where, e))
    return f"{where}: {e.strerror or e}: check the path, its permissions and the disk"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    a.argv = [str(x) for x in argv]
    debug = a.debug or os.environ.get("LWQ_DEBUG") == "1"
    try:
        {"score": cmd_score, "plan": cmd_plan, "convert": cmd_convert,
         "eval": cmd_eval, "compare": cmd_compare}[a.command](a)
    except LwqError as e:
        print(f"lwq-gguf: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lwq-gguf: interrupted; no output was written", file=sys.stderr)
        return 130
    except OSError as e:
        if debug:
            traceback.print_exc()
        print(f"lwq-gguf: error: {_os_error_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            traceback.print_exc()
        hint = "" if debug else "; run again with --debug (or LWQ_DEBUG=1) for the traceback"
        print(f"lwq-gguf: internal error (a bug in lwq-gguf, not in your input): "
              f"{type(e).__name__}: {str(e)[:200]}{hint}; please report it", file=sys.stderr)
        return EX_BUG
    return 0
