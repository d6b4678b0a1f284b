"""The command line: ``lwq-gguf score | plan | convert | eval``. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lwq_gguf import __version__
from lwq_gguf.errors import LwqError
from lwq_gguf.plan import STRATEGIES, PlanConfig, parse_override
from lwq_gguf.quants import AUTO_LADDER, DEFAULT_BASELINES, DEFAULT_LADDER, ENCODERS

EPILOG = "Types are llama.cpp's names (q2_k ... q8_0, f16). BPW = tensor bytes * 8 / tensor elements."


def _score_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring")
    g.add_argument("--calib", type=Path, help="calibration text (default: packaged WikiText-2 "
                   "validation excerpt)")
    g.add_argument("--calib-tokens", type=int, default=4096, help="tokens of it to use (4096)")
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
    g.add_argument("--avg-bits", type=float, required=required, nargs="+" if several else None,
                   metavar="B", help="target BPW of the whole file (llama.cpp's BPW, embeddings "
                   "included)" + ("; several targets allowed" if several else ""))
    g.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="auto (default): least expected KLD for the size (measured sensitivity, "
                   "knapsack); lim, zd, random: the paper's two-level layer ranking")
    g.add_argument("--imatrix", default="auto", metavar="auto|none|FILE",
                   help="importance matrix for planning and llama-quantize: auto (default: "
                   "computed from the calibration text), none, or a llama-imatrix .gguf file")
    g.add_argument("--ladder", help=f"types to choose from (default for --strategy auto: "
                   f"{','.join(AUTO_LADDER)}; for the others: {','.join(DEFAULT_LADDER)})")
    g.add_argument("--seed", type=int, default=0, help="seed of --strategy random")
    g.add_argument("--token-embedding-type", default="auto",
                   help="type of token_embd.weight, or auto: planned first (default auto)")
    g.add_argument("--output-tensor-type", default="auto",
                   help="type of output.weight, or auto: planned first (default auto)")
    g.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="fix matching tensors to TYPE, as llama-quantize does (repeatable)")
    g.add_argument("--encoder", choices=ENCODERS,
                   help="lwq (default; with --plan: the plan's): lwq-gguf's own Q4_K encoder (same "
                   "format, lower error), ggml's for the other types; ggml: llama-quantize's bytes")


def _plan_config(a: argparse.Namespace) -> PlanConfig:
    bits = a.avg_bits[0] if isinstance(a.avg_bits, list) else a.avg_bits
    return PlanConfig(bits, tuple(a.ladder.split(",")) if a.ladder else (), a.strategy, a.seed,
                      a.token_embedding_type.lower(), a.output_tensor_type.lower(),
                      tuple(parse_override(s) for s in a.tensor_type), a.encoder or "lwq")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lwq-gguf", epilog=EPILOG,
                                 description="Layer-wise mixed-precision GGUF quantization.")
    ap.add_argument("--version", action="version", version=f"lwq-gguf {__version__}")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="measure LIM and ZD per decoder layer", epilog=EPILOG)
    s.add_argument("model", type=Path, help="Hugging Face model folder")
    s.add_argument("-o", "--output", type=Path, help="scores JSON (default MODELNAME.scores.json)")
    s.add_argument("--png", type=Path, help="chart (default: the JSON path with .png)")
    s.add_argument("--force", action="store_true", help="replace existing outputs")
    s.add_argument("--no-sensitivity", action="store_true", help="LIM and ZD only (the paper's "
                   "strategies); skip the sensitivity analysis and imatrix of --strategy auto")
    _score_args(s)

    p = sub.add_parser("plan", help="choose a type for every tensor", epilog=EPILOG)
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", type=Path, help="plan JSON (default: print the tables only)")
    p.add_argument("--tensor-type-file", type=Path, help="also export for llama-quantize")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    _plan_args(p, required=True)
    _score_args(p)

    c = sub.add_parser("convert", help="HF folder -> layer-wise mixed-precision GGUF", epilog=EPILOG)
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
    m.add_argument("model", type=Path, help="Hugging Face model folder")
    m.add_argument("--text", type=Path, required=True, help="evaluation text, e.g. wiki.test.raw")
    m.add_argument("-o", "--output", type=Path, help="output folder (default compare-MODELNAME); "
                   "files and results in it are reused")
    m.add_argument("--baselines", default=",".join(DEFAULT_BASELINES),
                   help=f"llama-quantize mixes (default {','.join(DEFAULT_BASELINES)}; none)")
    m.add_argument("--ctx", type=int, default=512, help="tokens per chunk (512)")
    m.add_argument("--chunks", type=int, help="first N chunks (default: all)")
    m.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    _plan_args(m, required=False, several=True)
    _score_args(m)
    return ap


def _score_config(a):
    from lwq_gguf.score import ScoreConfig

    if a.calib_tokens < 16:
        raise LwqError(f"--calib-tokens {a.calib_tokens}: use at least 16")
    if a.device_map == "auto" and a.device == "cpu":
        raise LwqError("--device-map auto places the model on the GPUs: drop --device cpu")
    return ScoreConfig(a.calib, a.calib_tokens, 512, a.device, a.device_map, rescore=a.rescore)


def cmd_score(a) -> None:
    from lwq_gguf.imatrix import imatrix_from_dict, write_imatrix
    from lwq_gguf.load import open_model
    from lwq_gguf.pipeline import get_scores, model_tensors
    from lwq_gguf.report import table
    from lwq_gguf.score import plot_scores
    from lwq_gguf.write import atomic_write_text, check_output

    out = a.output or Path(f"{a.model.resolve().name}.scores.json")
    png = a.png or out.with_suffix(".png")
    imatrix = out.with_name(out.name.removesuffix(".json").removesuffix(".scores") + ".imatrix.gguf")
    for path in (out, png) + (() if a.no_sensitivity else (imatrix,)):
        check_output(path, a.force)
    model = open_model(a.model)
    keys = () if a.no_sensitivity else ("auto", "none")
    scores = get_scores(model, None, _score_config(a), not a.quiet, model_tensors(model),
                        AUTO_LADDER, keys)
    atomic_write_text(out, scores.to_json())
    if scores.imatrix:
        write_imatrix(imatrix_from_dict(scores.imatrix), imatrix)
    plot_scores(scores, png, f"{a.model.name}: layer importance")
    order = sorted(range(scores.n_layers), key=lambda i: -scores.lim[i])
    rank = {layer: i + 1 for i, layer in enumerate(order)}
    print(table(("layer", "LIM", "LIM rank", "ZD"),
                [(i, f"{scores.lim[i]:.4f}", rank[i], f"{scores.zd[i]:.4f}")
                 for i in range(scores.n_layers)]))
    sens = scores.sensitivity
    if sens:
        print(f"sensitivity of {len(next(iter(sens['damage'].values())))} tensors x {len(sens['ladder'])} types "
              f"(imatrix none and auto) in {sens['seconds']:.0f} s; imatrix written to {imatrix} "
              "(llama-quantize --imatrix)")
    print(f"{scores.calib_tokens} calibration tokens on {scores.device}; wrote {out} and {png}")


def cmd_plan(a) -> None:
    from lwq_gguf.load import open_model
    from lwq_gguf.pipeline import get_scores, imatrix_choice, model_tensors, plan_tensors
    from lwq_gguf.report import plan_layers_table, plan_summary, plan_types_table
    from lwq_gguf.write import atomic_write_text, check_output

    cfg = _plan_config(a)
    for path in (a.output, a.tensor_type_file):
        if path:
            check_output(path, a.force)
    model = open_model(a.model)
    key, given = imatrix_choice(a.imatrix)
    tensors = model_tensors(model)
    need = cfg.strategy == "auto" or key == "auto"
    scores = get_scores(model, a.scores, _score_config(a), not a.quiet, tensors, cfg.ladder,
                        key if need else None, given, cfg.encoder)
    plan = plan_tensors(tensors, model, cfg, scores, key)
    print(plan_layers_table(plan, scores.lim))
    print(plan_types_table(plan))
    print(plan_summary(plan))
    if a.output:
        atomic_write_text(a.output, plan.to_json(), a.force)
        print(f"wrote {a.output}")
    if a.tensor_type_file:
        atomic_write_text(a.tensor_type_file, plan.tensor_type_file(), a.force)
        print(f"wrote {a.tensor_type_file} (llama-quantize --tensor-type-file)")


def cmd_convert(a) -> None:
    from lwq_gguf.pipeline import convert
    from lwq_gguf.report import plan_summary, plan_types_table
    from lwq_gguf.write import WriteConfig

    if a.plan is None and a.avg_bits is None:
        raise LwqError("convert needs --avg-bits B (or --plan PLAN.json)")
    plan_cfg = _plan_config(a) if a.plan is None else None
    wcfg = WriteConfig(a.output, None, a.outtype, a.force, a.threads, a.two_step)
    modelfile = a.modelfile or (a.output.parent / "Modelfile" if a.ollama else None)
    if modelfile is not None:
        from lwq_gguf.ollama import modelfile_text
        from lwq_gguf.write import atomic_write_text, check_output

        check_output(modelfile, a.force)
    r = convert(a.model, wcfg, plan_cfg=plan_cfg, plan_file=a.plan, scores_file=a.scores,
                score_cfg=_score_config(a), imatrix=a.imatrix, verify=not a.no_verify,
                progress=not a.quiet, encoder=a.encoder)
    print(plan_types_table(r.plan))
    print(plan_summary(r.plan))
    check = f"llama.cpp check PPL {r.check.ppl:.2f} (4x128 tokens, CPU)" if r.check.ppl else "no check"
    size = r.output.stat().st_size / 2**20
    print(f"wrote {r.output}: {size:.1f} MiB, {r.check.bpw:.3f} BPW read back; {check}; "
          f"{r.seconds:.0f} s")
    if modelfile is not None:
        text, notes = modelfile_text(r.output, a.model, modelfile)
        atomic_write_text(modelfile, text, a.force)
        for note in notes:
            print(f"note: {note}")
        print(f"wrote {modelfile}: ollama create NAME -f {modelfile}")


def cmd_eval(a) -> None:
    import json

    from lwq_gguf.evaluate import EvalConfig, evaluate
    from lwq_gguf.llamacpp import find_llama_cpp
    from lwq_gguf.report import table

    if a.ctx < 16 or (a.chunks is not None and a.chunks < 1):
        raise LwqError("--ctx must be at least 16 and --chunks at least 1")
    r = evaluate(a.quant, a.text, find_llama_cpp(), EvalConfig(a.ctx, a.chunks, a.device, a.threads),
                 a.base, progress=not (a.quiet or a.json))
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

    from lwq_gguf.compare import CompareConfig, run_compare, write_outputs
    from lwq_gguf.evaluate import EvalConfig
    from lwq_gguf.quants import parse_mixes
    from lwq_gguf.report import COMPARE_HEADERS, compare_rows, table

    if a.ctx < 16 or (a.chunks is not None and a.chunks < 1):
        raise LwqError("--ctx must be at least 16 and --chunks at least 1")
    if a.scores:
        raise LwqError("compare scores the model once itself (OUT/scores.json): drop --scores")
    targets = tuple(dict.fromkeys(a.avg_bits or ()))
    out = a.output or Path(f"compare-{a.model.resolve().name}")
    plan = _plan_config(argparse.Namespace(**{**vars(a), "avg_bits": targets[0] if targets else 4.0}))
    cfg = CompareConfig(a.model, out, a.text, targets, plan, parse_mixes(a.baselines), a.imatrix,
                        _score_config(a), EvalConfig(a.ctx, a.chunks, a.device, a.threads),
                        a.threads)
    res = run_compare(cfg, progress=not a.quiet)
    paths = write_outputs(cfg, res, "lwq-gguf " + shlex.join(a.argv))
    print(table(COMPARE_HEADERS, compare_rows(res.rows)))
    print(f"{res.base.result.chunks} chunks x {a.ctx} tokens on {res.device}; {res.built} file(s) "
          f"built, {res.evaluated} evaluated, {len(res.rows) - res.evaluated} from cache; "
          f"{res.seconds:.0f} s")
    print("wrote " + ", ".join(str(p) for p in paths))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    a.argv = [str(x) for x in argv]
    try:
        {"score": cmd_score, "plan": cmd_plan, "convert": cmd_convert,
         "eval": cmd_eval, "compare": cmd_compare}[a.command](a)
    except LwqError as e:
        print(f"lwq-gguf: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lwq-gguf: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0
