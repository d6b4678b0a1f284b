"""The stages composed, once: model -> score -> plan -> write.

A :class:`Job` is what one command asks for one model, built once by the CLI (or a test, or
``compare``). :func:`prepare` opens the model, lists its GGUF tensors, gets the scores it needs
(from ``--scores``, the score cache, or measured) and plans; :func:`convert` then writes and
checks the file. ``score``, ``plan``, ``convert`` and ``compare`` all go through these two.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from lwq_gguf.errors import PlanError, VerifyError
from lwq_gguf.files import atomic_output, check_output, read_user_text, sha256_file
from lwq_gguf.llamacpp import LlamaCpp, find_llama_cpp
from lwq_gguf.model.inventory import (WRITTEN_MARK, ConverterJob, GGUFTensor, inventory,
                                      model_tensors, run_job, write_16bit)
from lwq_gguf.model.load import HFModel, open_model
from lwq_gguf.plan.guard import Budget, Guard, choose, measure, offered
from lwq_gguf.plan.mixes import mix_recipes
from lwq_gguf.plan.plan import Plan, PlanConfig, check_reach, make_plan
from lwq_gguf.plan.recipe import read_plan
from lwq_gguf.plan.size import SizeLimit, fit_size, predicted_bytes
from lwq_gguf.quant.encoder import damage_key, split_damage_key
from lwq_gguf.quant.imatrix import ImatrixChoice, imatrix_to_dict
from lwq_gguf.quant.gguf_file import read_back
from lwq_gguf.quant.types import AUTO_LADDER, DEFAULT_ENCODER
from lwq_gguf.score.cache import ScoreCache, model_sha256, remembered
from lwq_gguf.score.clock import Phases
from lwq_gguf.score.layers import score_model, zd_scores
from lwq_gguf.score.scores import ScoreConfig, Scores
from lwq_gguf.score.weights import BASIS_FISHER, BASIS_WEIGHTS
from lwq_gguf.write.verify import CheckResult, check_file
from lwq_gguf.write.writer import WriteConfig, cleanup, guard_dir, work_paths, write_gguf


@dataclass(frozen=True, kw_only=True)
class Job:
    """One command's intent for one model, parsed once."""

    model: Path
    score: ScoreConfig = field(default_factory=ScoreConfig)
    imatrix: ImatrixChoice = field(default_factory=ImatrixChoice)
    plan: PlanConfig | None = None  # plan with these settings ...
    plan_file: Path | None = None  # ... or use a saved plan (convert --plan)
    encoder: str | None = None  # with plan_file: replaces the plan's encoder
    scores_file: Path | None = None  # --scores: reuse `lwq-gguf score`'s output
    measure: tuple[str, ...] | None = None  # (score) imatrix settings to measure sensitivity
    # for; None: what the plan and --imatrix need
    ladder: tuple[str, ...] = AUTO_LADDER  # (score) the types measured; a plan brings its own
    # --size: the whole file at most this many bytes (the plan's avg_bits from size_target),
    # and within SIZE_SLACK of it; size_spec: as the user wrote it, for messages
    size_limit: int | None = None
    size_spec: str = ""
    # convert: set the plan beside llama.cpp's own mixes of the same size (plan.guard)
    mix_guard: bool = True
    progress: bool = True


@dataclass(frozen=True)
class Prepared:
    model: HFModel
    tensors: tuple[GGUFTensor, ...]
    scores: Scores | None
    plan: Plan | None
    imatrix: ImatrixChoice  # the one used (--imatrix auto means none without a forward pass)

    @property
    def planned(self) -> Plan:
        """The plan (of a job that plans or reads a plan)."""
        assert self.plan is not None, "a job without a plan"
        return self.plan

    @property
    def scored(self) -> Scores:
        """The scores (of a job that scores)."""
        assert self.scores is not None, "a job without scores"
        return self.scores


def load_scores(path: Path, model: HFModel) -> Scores:
    """A scores file, accepted only for the model (architecture, depth and weights) it was made on."""
    text = read_user_text(path, "scores", "make them with `lwq-gguf score`")
    scores = Scores.from_json(text, str(path))
    scores.check_model(model, model_sha256(model), str(path))
    return scores


def _has(scores: Scores, key: str, ladder: tuple[str, ...]) -> bool:
    sens = scores.sensitivity or {}
    return (scores.damage(key) is not None and set(ladder) <= set(sens.get("ladder", ()))
            and (split_damage_key(key)[0] != "auto" or scores.imatrix is not None))


def _digest(model: HFModel, warm: bool) -> str:
    """The model's digest. ``warm``: its weights are read for it (a model new here, whose scores
    are measured next), so they are hashed on a thread while this one imports PyTorch, which
    the measuring starts with (the hash phase then holds that import)."""
    if not warm:
        return model_sha256(model)
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(model_sha256, model)
        import torch  # noqa: F401
        return digest.result()


def get_scores(job: Job, model: HFModel, tensors, ladder: tuple[str, ...],
               keys: tuple[str, ...]) -> Scores:
    """Scores from ``job.scores_file``, else the score cache, else measured (and cached), with the
    sensitivity tables ``keys`` (damage keys) over ``ladder`` added when missing. ``tensors``:
    the GGUF tensor list, or a function that returns it (called when the tables need it).

    The weights are checked for NaN/Inf when measured or taken from a file (a cache hit means the
    bytes are those already checked).
    """
    tensors_of = tensors if callable(tensors) else (lambda: tensors)
    cache, fresh, phases = None, False, Phases()
    if job.scores_file is None:
        with phases("hash"):
            digest = _digest(model, warm=model.arch is not None and not remembered(model))
        cache = ScoreCache(model, digest, job.score)
        scores = None if job.score.rescore else cache.load()
        if scores is not None and job.progress:
            print(f"scores: reusing {cache.path} (--rescore to measure again)", file=sys.stderr)
    else:
        scores = load_scores(job.scores_file, model)
        zd_scores(model, job.progress)  # the NaN/Inf check still reads every weight
    missing = keys if scores is None else tuple(k for k in keys if not _has(scores, k, ladder))
    if scores is None and (not missing or model.arch is None):  # layer scores alone
        scores, fresh = score_model(model, job.score, digest, job.progress), True
    if missing:
        sens: dict
        from lwq_gguf.score.sensitivity import SensitivityRequest, measure_sensitivity

        if model.arch is None:  # no forward pass: weight error, in the converter child
            sens, im = _weight_sensitivity(job, model, tensors_of(), ladder, missing), None
        else:  # one pass: LIM, ZD, imatrix and the damage tables
            req = SensitivityRequest(ladder=ladder, keys=missing, given=job.imatrix.given())
            m = measure_sensitivity(model, tensors_of, req, job.score, job.progress, phases)
            sens, im = m.sensitivity, m.imatrix
            sens["basis"] = BASIS_FISHER
            if scores is None:  # (a scores file or the cache always has its layer scores)
                calib = job.score.calib_file
                scores = Scores(model.architecture, model.n_layers, m.lim, m.zd, calib.name,
                                sha256_file(calib), m.tokens, m.device, digest)
        assert scores is not None
        old = scores.sensitivity or {}
        if old.get("ladder") == sens["ladder"]:  # keep the tables already measured
            sens["damage"] = {**old["damage"], **sens["damage"]}
        scores = replace(scores, sensitivity=sens,
                         imatrix=imatrix_to_dict(im) if im is not None else scores.imatrix)
        fresh = True
    assert scores is not None
    if cache is not None and fresh:  # once, complete: a run killed before leaves the old entry
        cache.store(scores)
    return scores


def _weight_sensitivity(job: Job, model: HFModel, tensors: tuple[GGUFTensor, ...],
                        ladder: tuple[str, ...], keys: tuple[str, ...]) -> dict:
    """Damage tables from weight error (score.weights), made by the converter child on the
    tensors as it writes them."""
    import json
    import tempfile

    from tqdm import tqdm

    from lwq_gguf.score import weights

    t0, lc = time.time(), find_llama_cpp()
    files = {job.imatrix.key: str(job.imatrix.path)} if job.imatrix.mode == "file" else {}
    bar = tqdm(total=len(tensors), desc="weight error per type", unit="tensor",
               disable=not job.progress, leave=False)
    with tempfile.TemporaryDirectory(prefix="lwq-dmg-") as tmp:
        out = Path(tmp) / "damage.json"
        task = weights.WeightDamageJob(ladder=ladder, keys=keys, imatrix_files=files).task()
        run_job(ConverterJob(mode="damage", src=str(lc.src), model=str(model.path), out=str(out),
                             task=task), weights.__name__,
                on_line=lambda ln: bar.update() if ln.startswith(WRITTEN_MARK) else None)
        damage = json.loads(out.read_text())
    bar.close()
    return {"tokens": 0, "seconds": round(time.time() - t0, 1), "ladder": list(ladder),
            "damage": damage, "basis": BASIS_WEIGHTS}


def _effective(job: Job, model: HFModel) -> Job:
    """--imatrix auto is computed by a forward pass: for an architecture lwq-gguf runs none of,
    it means no imatrix (the plan is then from weight error, and says so)."""
    if model.arch is not None or job.imatrix.mode != "auto":
        return job
    if job.progress:
        print(f"{model.architecture}: lwq-gguf runs no forward pass of this architecture, so the "
              "plan weighs weight error alone (pass --imatrix FILE made by llama-imatrix to weight "
              "it by the activations)", file=sys.stderr)
    measure = tuple(k for k in job.measure if k != "auto") if job.measure else job.measure
    return replace(job, imatrix=ImatrixChoice.parse("none"), measure=measure)


def _needs(job: Job, plan: Plan | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(ladder, damage keys) the job's scores must hold; no keys: layer scores only."""
    if job.plan is not None:
        cfg = job.plan
        need = cfg.strategy == "auto" or job.imatrix.mode == "auto"
        return cfg.ladder, (damage_key(job.imatrix.key, cfg.encoder),) if need else ()
    encoder = plan.config.encoder if plan is not None else DEFAULT_ENCODER
    keys = job.measure if job.measure is not None else (
        ("auto",) if job.imatrix.mode == "auto" else ())
    return job.ladder, tuple(damage_key(k, encoder) for k in keys)


def prepare(job: Job) -> Prepared:
    """Open the model, list its tensors, score what the job needs and plan (when it plans)."""
    model = open_model(job.model)
    job = _effective(job, model)
    # the tensor list (the converter in a child process, seconds when not cached) is made while
    # the scoring pass runs; a plan's budget is checked with it before the slow scoring
    with ThreadPoolExecutor(max_workers=1) as pool:
        # (a job that plans measures the 16-bit file's header in the same converter run)
        listing = pool.submit(model_tensors, model, job.plan is not None)
        plan = None
        if job.plan_file is not None:
            plan = read_plan(job.plan_file, listing.result())
            if job.encoder is not None:
                plan = replace(plan, config=replace(plan.config, encoder=job.encoder))
        elif job.plan is not None:
            check_reach(listing.result(), job.plan, imatrix=job.imatrix.used)
        ladder, keys = _needs(job, plan)
        scores = None
        if job.plan_file is None or job.scores_file is not None or keys:
            scores = get_scores(job, model, listing.result, ladder, keys)
        tensors = listing.result()
    if job.plan is not None:
        assert scores is not None  # (a job that plans is scored)

        def make(cfg: PlanConfig) -> Plan:
            plan = make_plan(tensors, model.n_layers, cfg, scores.lim, scores.zd,
                             scores.damage(damage_key(job.imatrix.key, cfg.encoder)))
            if cfg.strategy == "auto":
                plan = replace(plan, basis=(scores.sensitivity or {}).get("basis", BASIS_FISHER))
            return plan

        plan = make(job.plan) if job.size_limit is None else fit_size(
            job.plan, SizeLimit(bytes=job.size_limit, spec=job.size_spec),
            inventory(model), job.imatrix.used,
            scores.to_json() if scores else None, make)
    return Prepared(model, tensors, scores, plan, job.imatrix)


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    plan: Plan  # what the file holds: the plan, or a llama.cpp mix's recipe (plan.mix)
    scores: Scores | None
    check: CheckResult
    seconds: float
    guard: Guard | None = None  # the plan set beside llama.cpp's mixes (None: not asked)


def _guard(job: Job, p: Prepared) -> Guard | None:
    """The plan beside llama.cpp's own mixes of the same budget (:mod:`lwq_gguf.plan.guard`):
    for a planned (--strategy auto) file without a separate non-expert budget."""
    cfg = job.plan
    if (not job.mix_guard or cfg is None or cfg.strategy != "auto" or p.scores is None
            or cfg.dense_bytes is not None or cfg.dense_bits is not None):
        return None
    damage = p.scores.damage(damage_key(p.imatrix.key, cfg.encoder))
    if damage is None:
        return None
    imatrix = p.imatrix.used
    recipes = mix_recipes(p.model, p.tensors, offered(imatrix))
    header = inventory(p.model).header_bytes
    scores_json = p.scores.to_json()
    budget = (Budget(size=job.size_limit) if job.size_limit is not None
              else Budget(avg_bits=cfg.avg_bits))
    return choose(p.planned, recipes, damage, budget,
                  lambda plan: predicted_bytes(header, plan, scores_json, imatrix))


def _measure(g: Guard, job: Job, p: Prepared, write: WriteConfig, partial: Path,
             lc: LlamaCpp) -> Guard:
    """Write the mix's own file beside the planned one, measure both (plan.guard.measure)
    and leave the winner at ``partial``."""
    assert g.verify is not None
    folder = guard_dir(write.output)
    need = 2 * sum(t.numel for t in p.tensors) + g.verify.nbytes + (256 << 20)
    free = shutil.disk_usage(write.output.parent).free
    if free < need:  # the plan is the better by its estimate: kept, and the summary says so
        return replace(g, verify=None, note=f"not measured: the 16-bit model and the mix need "
                       f"{need / 2**30:.1f} GiB free beside the output, {free / 2**30:.1f} GiB are")
    folder.mkdir(exist_ok=True)
    try:
        out = folder / "mix.gguf"
        im = p.imatrix.file_for_llama(p.scores.imatrix if p.scores else None,
                                      work_paths(out)[0] / "imatrix.gguf")
        mix_file = write_gguf(lc, p.model.path, g.verify, None,
                              replace(write, output=out, imatrix=im), job.progress)
        base = folder / "base.gguf"
        write_16bit(lc, p.model.path, base)
        g = measure(g, (partial, mix_file), base, job.score.calib_file, lc, job.progress)
        if g.chosen.mix:
            os.replace(mix_file, partial)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return g


def _encoder(job: Job) -> str:
    """The encoder the file will be written with (known before any slow step)."""
    if job.plan is not None:
        return job.plan.encoder
    if job.encoder is not None or job.plan_file is None:
        return job.encoder or DEFAULT_ENCODER
    try:
        return Plan.from_json(job.plan_file.read_text(), str(job.plan_file)).config.encoder
    except (OSError, UnicodeDecodeError):
        return DEFAULT_ENCODER  # read_plan says what is wrong with it, in order


def convert(job: Job, write: WriteConfig, verify: bool = True) -> ConvertResult:
    """HF folder -> planned GGUF at ``write.output``; nothing is left there on failure.

    ``verify``: the file is read back, its types compared with the plan, and run in llama.cpp
    (:func:`lwq_gguf.write.verify.check_file`) before it takes its name."""
    t0 = time.time()
    out = write.output
    check_output(out, write.force, write.reads)
    lc = find_llama_cpp()
    cleanup(out)  # what a killed earlier run may have left beside the target
    try:
        if write.two_step and _encoder(job) != "ggml":
            raise PlanError("--two-step runs llama-quantize, which encodes Q4_K its own way: add "
                            "--encoder ggml, or drop --two-step")
        p = prepare(job)
        if write.two_step and p.scores is None:  # the single pass checks every weight as it goes
            zd_scores(p.model, job.progress)  # the NaN/Inf check reads every weight
        guard = _guard(job, p)
        plan = guard.chosen if guard is not None else p.planned
        im_path = p.imatrix.file_for_llama(p.scores.imatrix if p.scores else None,
                                           work_paths(out)[0] / "imatrix.gguf")
        scores_json = p.scores.to_json() if p.scores else None
        with atomic_output(out) as partial:
            written = write_gguf(lc, p.model.path, plan, scores_json,
                                 replace(write, imatrix=im_path), job.progress)
            assert written == partial, (written, partial)
            if guard is not None and guard.verify is not None:
                guard = _measure(guard, job, p, write, partial, lc)
                plan = guard.chosen
            check = (check_file(partial, plan, job.score.calib_file, out) if verify
                     else CheckResult(read_back(partial).bpw, None))
            if job.size_limit is not None and partial.stat().st_size > job.size_limit:
                raise VerifyError(f"{out}: {partial.stat().st_size} bytes, above --size "
                                  f"{job.size_spec}: report this bug")
    finally:
        cleanup(out)  # the work folder (and a partial file, never the target)
    return ConvertResult(out, plan, p.scores, check, time.time() - t0, guard)
