"""The commands: the parsed arguments built once into frozen configs, one call into the
pipeline (or the evaluate / publish stage), a printed summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lwq_gguf.errors import LwqError
from lwq_gguf.plan.budget import parse_size
from lwq_gguf.plan.plan import PlanConfig, parse_override
from lwq_gguf.quant.types import DEFAULT_ENCODER, parse_ladder


# ---- intent: the parsed arguments as frozen configs, built once -------------------------------

def _score_config(a):
    from lwq_gguf.score.scores import ScoreConfig

    if a.device_map == "auto" and a.device == "cpu":
        raise LwqError("--device-map auto places the model on the GPUs: drop --device cpu")
    return ScoreConfig(calib=a.calib, calib_tokens=a.calib_tokens,
                       fisher_tokens=a.fisher_tokens, device=a.device,
                       device_map=a.device_map, precision=a.score_precision,
                       rescore=a.rescore)


def _targets(a):
    """--avg-bits B ... or --size SIZE ... as family targets (lwq_gguf.publish.family)."""
    from lwq_gguf.publish.family import parse_targets

    return parse_targets(a.avg_bits, getattr(a, "size", None))


def _one_job(a, targets, **kw):
    """The Job of a command that makes one plan: one target, a size resolved to its BPW."""
    from lwq_gguf.publish.family import target_job

    if len(targets) != 1:
        raise LwqError(f"{a.command} takes one target (got {len(targets)}): --avg-bits B or "
                       "--size SIZE (`lwq-gguf convert ... -o FOLDER/` writes a family of "
                       "several; `lwq-gguf compare` measures several)")
    t = targets[0]
    job = _job(a, plan=_plan_config(a, t.bits if t.bits is not None else 4.0), **kw)
    return target_job(job, t) if t.size is not None else job


def _plan_config(a, bits: float) -> PlanConfig:
    return PlanConfig(avg_bits=bits, ladder=tuple(a.ladder.split(",")) if a.ladder else (),
                      strategy=a.strategy, seed=a.seed,
                      token_embedding_type=a.token_embedding_type.lower(),
                      output_tensor_type=a.output_tensor_type.lower(),
                      overrides=tuple(parse_override(s) for s in a.tensor_type),
                      encoder=a.encoder or DEFAULT_ENCODER,
                      dense_bytes=parse_size(a.dense_size) if a.dense_size else None,
                      dense_bits=a.dense_bits)


def _reads(a):
    """Every file and model folder the command reads: no output may replace one of them."""
    from lwq_gguf.files import Reads

    imatrix = getattr(a, "imatrix", None)
    named = ("model", "recipe", "plan", "scores", "calib", "text", "eval", "quant", "base")
    return Reads.of(*(getattr(a, k, None) for k in named), *getattr(a, "files", ()),
                    None if imatrix in (None, "auto", "none") else imatrix)


def _job(a, **kw):
    from lwq_gguf.pipeline import Job
    from lwq_gguf.quant.imatrix import ImatrixChoice

    imatrix = ImatrixChoice.parse(getattr(a, "imatrix", "auto"))
    return Job(model=a.model, score=_score_config(a), imatrix=imatrix, scores_file=a.scores,
               mix_guard=not getattr(a, "no_mix_guard", False), progress=not a.quiet, **kw)


# ---- the commands ------------------------------------------------------------------------------

def cmd_score(a) -> None:
    from lwq_gguf.publish.outputs import ScoreFiles, write_scores
    from lwq_gguf.report import table

    if a.scores:
        raise LwqError("score measures the scores: drop --scores")
    files = ScoreFiles.named(a.model, a.output, a.png, sensitivity=not a.no_sensitivity)
    ladder = {"ladder": parse_ladder(a.ladder)} if a.ladder else {}
    job = _job(a, measure=() if a.no_sensitivity else ("auto",), **ladder)
    scores = write_scores(job, files, a.force, _reads(a)).scored
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
              + (f"; imatrix written to {files.imatrix} (llama-quantize --imatrix)"
                 if files.imatrix and scores.imatrix else ""))
        if sens.get("phases"):
            print("time (s): " + ", ".join(f"{k} {v:g}" for k, v in sens["phases"].items())
                  + " (sweeps: CPU seconds over the worker threads)"
                  + (f"; quantizers {sens['quantizers']}" if sens.get("quantizers") else ""))
    print(f"{scores.calib_tokens} calibration tokens on {scores.device}; wrote {files.scores} "
          f"and {files.png}")


def cmd_plan(a) -> None:
    from lwq_gguf.publish.outputs import write_plan
    from lwq_gguf.report import plan_layers_table, plan_summary, plan_types_table

    p = write_plan(_one_job(a, _targets(a)), a.output, a.tensor_type_file, a.force, _reads(a))
    print(plan_layers_table(p.planned, p.scores.lim if p.scores else None))
    print(plan_types_table(p.planned))
    print(plan_summary(p.planned))
    if a.output:
        print(f"wrote {a.output}")
    if a.tensor_type_file:
        print(f"wrote {a.tensor_type_file} (llama-quantize --tensor-type-file)")


def cmd_convert(a) -> None:
    import shlex

    from lwq_gguf.publish.release import ReleaseConfig, release
    from lwq_gguf.report import plan_summary, plan_types_table, table
    from lwq_gguf.write.writer import WriteConfig

    folder = a.output.endswith(("/", os.sep))  # (-o FOLDER/: a family, even of one file)
    a.output = Path(a.output)
    targets = _targets(a)
    write = WriteConfig(output=a.output, outtype=a.outtype, force=a.force, threads=a.threads,
                        two_step=a.two_step, reads=_reads(a))
    fixed = a.plan or a.recipe  # (read_plan tells a GGUF recipe from a plan JSON)
    if a.plan and a.recipe:
        raise LwqError("--plan and --recipe both fix every tensor's type: give one")
    if fixed is None and not targets:
        raise LwqError("convert needs --avg-bits B (or --size SIZE, --plan PLAN.json or "
                       "--recipe OTHER.gguf)")
    common: dict[str, Any] = dict(write=write, verify=not a.no_verify,
                                  command="lwq-gguf " + shlex.join(a.argv))
    if fixed is not None:
        if targets:
            raise LwqError(f"{fixed} fixes every tensor's type: drop --avg-bits/--size")
        if a.recipe and not a.recipe.is_file():
            raise LwqError(f"{a.recipe}: no such file: give --recipe the path of a .gguf file")
        cfg = ReleaseConfig(job=_job(a, plan_file=fixed, encoder=a.encoder),
                            modelfile=_modelfile(a), **common)
    elif len(targets) > 1 or folder or a.output.is_dir() or a.card or a.eval:
        cfg = _family_release(a, targets, common)
    else:
        cfg = ReleaseConfig(job=_one_job(a, targets), modelfile=_modelfile(a), **common)
    family = cfg.family

    def done(o) -> None:
        if o.result is None:
            print(f"FAILED {o.target.label}: {o.error}")
            return
        r, mib = o.result, o.path.stat().st_size / 2**20
        if family:
            print(f"wrote {o.path}: {mib:.1f} MiB, {r.check.bpw:.3f} BPW; {r.seconds:.0f} s",
                  flush=True)
            return
        check = f"llama.cpp check PPL {r.check.ppl:.2f} (4x128 tokens, CPU)" if r.check.ppl else "no check"
        print(plan_types_table(r.plan))
        print(plan_summary(r.plan))
        if r.guard is not None:
            print(f"llama.cpp's mixes: {r.guard.line()}")
        print(f"wrote {o.path}: {mib:.1f} MiB, {r.check.bpw:.3f} BPW read back; {check}; "
              f"{r.seconds:.0f} s")

    out = release(cfg, on_done=done)
    if family:
        print(table(("target", "file", "MiB", "BPW", "check PPL", "types"),
                    [(o.target.label, o.path.name, f"{o.path.stat().st_size / 2**20:.1f}",
                      f"{o.result.check.bpw:.3f}", f"{o.result.check.ppl:.2f}"
                      if o.result.check.ppl else "-", "…".join(o.result.plan.pair))
                     if o.result else (o.target.label, o.path.name, "-", "-", "-", "FAILED")
                     for o in out.outcomes]))
    for line in out.lines:
        print(line)
    if family:
        out.raise_failures(a.output)
        print(f"{len(out.outcomes)} file(s) in {a.output}")


def _modelfile(a) -> Path | None:
    """One file's Modelfile: --modelfile, or with --ollama ``Modelfile`` beside the file."""
    return a.modelfile or (a.output.parent / "Modelfile" if a.ollama else None)


def _family_release(a, targets, common):
    """A family (several targets, -o FOLDER/, --card or --eval): its release, checked."""
    from lwq_gguf.publish.release import ReleaseConfig

    if a.modelfile:
        raise LwqError("--modelfile names one Modelfile; a family gets FILE.Modelfile beside each "
                       "file with --ollama: drop --modelfile")
    if a.output.suffix == ".gguf":
        raise LwqError(f"-o {a.output}: a family, a card or --eval write into a folder: give -o "
                       "FOLDER/")
    if a.card and a.no_card:
        raise LwqError("--card and --no-card: give one")
    job = _job(a, plan=_plan_config(a, targets[0].bits or 4.0))
    return ReleaseConfig(job=job, targets=targets, ollama=a.ollama, card=not a.no_card,
                         evaluate=_family_compare(a, job, common["write"].reads) if a.eval
                         else None, **common)


def _family_compare(a, job, reads):
    """--eval: the comparison that measures the family (files added once written)."""
    from lwq_gguf.publish.compare import CompareConfig

    if not a.eval.is_file():
        raise LwqError(f"{a.eval}: no such text file: pass --eval FILE (e.g. wiki.test.raw)")
    return CompareConfig(model=a.model, out_dir=a.output.with_name(a.output.name + "-eval"),
                         text=a.eval, targets=(), plan=job.plan,
                         baselines=_baselines(a, job.imatrix),
                         imatrix=job.imatrix, score=job.score, eval=_eval_config(a),
                         threads=a.threads, reads=reads)


def _baselines(a, imatrix) -> tuple[str, ...]:
    """--baselines, or the default mixes (the i-quant ones only with an imatrix)."""
    from lwq_gguf.quant.types import default_baselines, parse_mixes

    if a.baselines is not None:
        return parse_mixes(a.baselines)
    return default_baselines(imatrix.used)


def _eval_config(a):
    from lwq_gguf.evaluate.perplexity import EvalConfig

    if a.ctx < 16 or (a.chunks is not None and a.chunks < 1):
        raise LwqError("--ctx must be at least 16 and --chunks at least 1")
    return EvalConfig(ctx=a.ctx, chunks=a.chunks, device=a.device, threads=a.threads)


def cmd_eval(a) -> None:
    import json

    from lwq_gguf.evaluate.perplexity import evaluate
    from lwq_gguf.llamacpp import find_llama_cpp
    from lwq_gguf.report import eval_rows, table

    r = evaluate(a.quant, a.text, find_llama_cpp(), _eval_config(a), a.base,
                 progress=not (a.quiet or a.json))
    if a.json:
        print(json.dumps(r.to_dict()))
        return
    print(table(("metric", "value"), eval_rows(r)))
    print(f"{r.chunks} chunks x {a.ctx} tokens, {r.tokens_scored} scored, llama.cpp on {r.device}")


def cmd_compare(a) -> None:
    import shlex

    from lwq_gguf.publish.compare import CompareConfig, run_compare, write_outputs
    from lwq_gguf.quant.imatrix import ImatrixChoice
    from lwq_gguf.report import COMPARE_HEADERS, compare_rows, table

    if a.scores:
        raise LwqError("compare scores the model once itself (OUT/scores.json): drop --scores")
    targets = tuple(dict.fromkeys(a.avg_bits or ()))
    imatrix = ImatrixChoice.parse(a.imatrix)
    cfg = CompareConfig(model=a.model, out_dir=a.output or Path(f"compare-{a.model.resolve().name}"),
                        text=a.text, targets=targets,
                        plan=_plan_config(a, targets[0] if targets else 4.0),
                        baselines=_baselines(a, imatrix), imatrix=imatrix,
                        score=_score_config(a), eval=_eval_config(a), threads=a.threads,
                        reads=_reads(a))
    res = run_compare(cfg, progress=not a.quiet)
    paths = write_outputs(cfg, res, "lwq-gguf " + shlex.join(a.argv))
    print(table(COMPARE_HEADERS, compare_rows(res.rows)))
    print(f"{res.base.result.chunks} chunks x {a.ctx} tokens on {res.device}; {res.built} file(s) "
          f"built, {res.evaluated} evaluated, {len(res.rows) - res.evaluated} from cache; "
          f"{res.seconds:.0f} s")
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_inspect(a) -> None:
    import json

    from lwq_gguf.files import check_output
    from lwq_gguf.publish.inspect import describe, heatmap, render

    if len(a.files) > 2:
        raise LwqError(f"inspect takes one or two files (got {len(a.files)}): inspect A.gguf "
                       "[B.gguf]")
    if a.png:
        check_output(a.png, a.force, _reads(a))
    doc = describe(a.files)
    print(json.dumps(doc) if a.json else render(doc))
    if a.png:
        heatmap(doc, a.png)
        if not a.json:
            print(f"wrote {a.png}")
