"""The stages composed: score, plan and convert as the CLI (and tests) run them."""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from lwq_gguf.errors import LwqError, PlanError
from lwq_gguf.hfconvert import converter_inventory
from lwq_gguf.kquant import damage_key, split_damage_key
from lwq_gguf.imatrix import Imatrix, imatrix_from_dict, imatrix_to_dict, read_imatrix, write_imatrix
from lwq_gguf.load import HFModel, open_model
from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.plan import GGUFTensor, Plan, PlanConfig, check_reach, make_plan
from lwq_gguf.quants import AUTO_LADDER
from lwq_gguf.score import ScoreConfig, Scores, score_model, zd_scores
from lwq_gguf.scorecache import ScoreCache, cached_inventory
from lwq_gguf.verify import CheckResult, check_file, read_back
from lwq_gguf.write import (WriteConfig, check_output, check_plan_matches, cleanup,
                            publish, work_paths, write_gguf)


def load_scores(path: Path, model: HFModel) -> Scores:
    try:
        text = path.read_text()
    except OSError as e:
        raise LwqError(f"{path}: cannot read scores ({e.strerror}): make them with `lwq-gguf score`")
    scores = Scores.from_json(text, str(path))
    scores.check_model(model, str(path))
    return scores


def imatrix_choice(spec: str | Path | None) -> tuple[str, dict[str, Imatrix]]:
    """--imatrix none|auto|FILE -> (damage key, {key: Imatrix} for a file)."""
    spec = "none" if spec is None else str(spec)
    if spec in ("none", "auto"):
        return spec, {}
    path = Path(spec)
    if not path.is_file():
        raise LwqError(f"{path}: imatrix file not found: make one with llama-imatrix, or use "
                       "--imatrix auto (computed from the calibration text) or none")
    key = "file:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return key, {key: read_imatrix(path)}


def _has_sensitivity(scores: Scores, key: str, ladder: tuple[str, ...]) -> bool:
    sens = scores.sensitivity or {}
    return (scores.damage(key) is not None and set(ladder) <= set(sens.get("ladder", ()))
            and (split_damage_key(key)[0] != "auto" or scores.imatrix is not None))


def get_scores(model: HFModel, scores_file: Path | None, score_cfg: ScoreConfig, progress: bool,
               tensors: tuple[GGUFTensor, ...] | None = None, ladder: tuple[str, ...] = (),
               imatrix_key: str | tuple[str, ...] | None = None,
               given: dict[str, Imatrix] | None = None, encoder: str = "lwq") -> Scores:
    """Scores from ``scores_file``, else from the score cache, else measured (and cached).

    The weights are checked for NaN/Inf when measured or taken from a file (a cache hit means
    the bytes are those already checked). With ``imatrix_key`` (one or several: strategy auto,
    or --imatrix auto) the sensitivity analysis and the imatrix are added when the scores do not
    hold them for that key, ``encoder`` and ladder.
    """
    cache, fresh = None, False
    if scores_file is None:
        cache = ScoreCache(model, score_cfg)
        scores = None if score_cfg.rescore else cache.load()
        if scores is None:
            scores = score_model(model, score_cfg, progress)
            fresh = True
        elif progress:
            print(f"scores: reusing {cache.path} (--rescore to measure again)", file=sys.stderr)
    else:
        scores = load_scores(scores_file, model)
        zd_scores(model, progress)  # the NaN/Inf check still reads every weight
    keys = (imatrix_key,) if isinstance(imatrix_key, str) else tuple(imatrix_key or ())
    keys = tuple(damage_key(k, encoder) for k in keys)
    missing = tuple(k for k in keys if not _has_sensitivity(scores, k, ladder))
    if missing:
        from lwq_gguf.sensitivity import measure_sensitivity

        sens, im = measure_sensitivity(model, tensors or model_tensors(model), ladder,
                                       find_llama_cpp(), score_cfg, missing, given, progress)
        old = scores.sensitivity or {}
        if old.get("ladder") == sens["ladder"]:  # keep the tables already measured
            sens["damage"] = {**old["damage"], **sens["damage"]}
        scores = replace(scores, sensitivity=sens, imatrix=imatrix_to_dict(im))
        fresh = True
    if cache is not None and fresh:  # once, complete: a run killed before leaves the old entry
        cache.store(scores)
    return scores


def model_tensors(model: HFModel) -> tuple[GGUFTensor, ...]:
    """The GGUF tensor list, from the pinned converter itself (cached by model content)."""
    lc = find_llama_cpp()

    def run() -> list[dict]:
        with tempfile.TemporaryDirectory(prefix="lwq-inv-") as tmp:
            return converter_inventory(lc, model.path, Path(tmp) / "inventory.json")

    rows = cached_inventory(model, lc.src / "convert_hf_to_gguf.py", run)
    return tuple(GGUFTensor(r["name"], tuple(r["shape"]), r["type"]) for r in rows)


def plan_tensors(tensors: tuple[GGUFTensor, ...], model: HFModel, cfg: PlanConfig,
                 scores: Scores | None, imatrix_key: str = "none") -> Plan:
    return make_plan(tensors, model.n_layers, cfg, scores.lim if scores else None,
                     scores.zd if scores else None,
                     scores.damage(damage_key(imatrix_key, cfg.encoder)) if scores else None)


def read_plan(path: Path, tensors: tuple[GGUFTensor, ...]) -> Plan:
    try:
        plan = Plan.from_json(path.read_text(), str(path))
    except OSError as e:
        raise PlanError(f"{path}: cannot read plan ({e.strerror})") from None
    check_plan_matches(plan, tensors, str(path))
    return plan


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    plan: Plan
    scores: Scores | None
    check: CheckResult
    seconds: float


def convert(model_dir: Path, write_cfg: WriteConfig, *, plan_cfg: PlanConfig | None = None,
            plan_file: Path | None = None, scores_file: Path | None = None,
            score_cfg: ScoreConfig = ScoreConfig(), imatrix: str | Path | None = "auto",
            verify: bool = True, progress: bool = True, encoder: str | None = None
            ) -> ConvertResult:
    """HF folder -> planned GGUF at ``write_cfg.output``; nothing is left there on failure.

    ``imatrix``: "auto" (computed from the calibration text, used for planning and quantizing),
    "none", or an imatrix file (llama-imatrix's GGUF format). ``encoder`` replaces the plan
    file's (with ``plan_cfg`` it is ``plan_cfg.encoder``).
    """
    t0 = time.time()
    out = write_cfg.output
    check_output(out, write_cfg.force)
    lc = find_llama_cpp()
    cleanup(out)  # what a killed earlier run may have left beside the target
    model = open_model(model_dir)
    key, given = imatrix_choice(imatrix)
    try:
        tensors = model_tensors(model)
        if plan_file is not None:
            plan = read_plan(plan_file, tensors)
            if encoder is not None:
                plan = replace(plan, config=replace(plan.config, encoder=encoder))
        else:  # the budget and type names are checked before the (slow) scoring
            check_reach(tensors, plan_cfg)
        encoder = plan.config.encoder if plan_file is not None else plan_cfg.encoder
        if write_cfg.two_step and encoder != "ggml":
            raise PlanError("--two-step runs llama-quantize, which encodes Q4_K its own way: add "
                            "--encoder ggml, or drop --two-step")
        need = key == "auto" or (plan_file is None and plan_cfg.strategy == "auto")
        scores = None
        if plan_file is None or scores_file is not None or need:
            ladder = plan_cfg.ladder if plan_cfg else AUTO_LADDER
            scores = get_scores(model, scores_file, score_cfg, progress, tensors, ladder,
                                key if need else None, given, encoder)
        elif write_cfg.two_step:  # the single-pass writer checks every weight as it goes
            zd_scores(model, progress)  # the NaN/Inf check reads every weight
        if plan_file is None:
            plan = plan_tensors(tensors, model, plan_cfg, scores, key)
        im_path = Path(imatrix) if given else None
        if key == "auto":
            work = work_paths(out)[0]
            work.mkdir(exist_ok=True)
            im_path = work / "imatrix.gguf"
            write_imatrix(imatrix_from_dict(scores.imatrix), im_path)
        partial = write_gguf(lc, model.path, plan, scores, replace(write_cfg, imatrix=im_path),
                             progress)
        if verify:
            check = check_file(lc, partial, plan, score_cfg.calib_file, shown_as=out)
        else:
            check = CheckResult(read_back(partial).bpw, None)
        publish(partial, out)
    except BaseException:
        cleanup(out)
        raise
    return ConvertResult(out, plan, scores, check, time.time() - t0)
