"""The stages composed: score, plan and convert as the CLI (and tests) run them."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from lwq_gguf.errors import LwqError, PlanError
from lwq_gguf.load import HFModel, open_model
from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.plan import GGUFTensor, Plan, PlanConfig, make_plan
from lwq_gguf.score import ScoreConfig, Scores, score_model, zd_scores
from lwq_gguf.verify import CheckResult, check_file, read_back
from lwq_gguf.write import (WriteConfig, check_output, check_plan_matches, cleanup, inventory,
                            publish, write_gguf)


def load_scores(path: Path, model: HFModel) -> Scores:
    try:
        text = path.read_text()
    except OSError as e:
        raise LwqError(f"{path}: cannot read scores ({e.strerror}): make them with `lwq-gguf score`")
    scores = Scores.from_json(text, str(path))
    scores.check_model(model, str(path))
    return scores


def get_scores(model: HFModel, scores_file: Path | None, score_cfg: ScoreConfig,
               progress: bool) -> Scores:
    """Scores from ``scores_file``, else measured. The weights are always checked for NaN/Inf."""
    if scores_file is None:
        return score_model(model, score_cfg, progress)
    scores = load_scores(scores_file, model)
    zd_scores(model, progress)  # the NaN/Inf check still reads every weight
    return scores


def model_tensors(model: HFModel) -> tuple[GGUFTensor, ...]:
    """The GGUF tensor list, from the pinned converter itself."""
    with tempfile.TemporaryDirectory(prefix="lwq-inv-") as tmp:
        return inventory(find_llama_cpp(), model.path, Path(tmp))


def plan_tensors(tensors: tuple[GGUFTensor, ...], model: HFModel, cfg: PlanConfig,
                 scores: Scores | None) -> Plan:
    return make_plan(tensors, model.n_layers, cfg,
                     scores.lim if scores else None, scores.zd if scores else None)


def plan_model(model: HFModel, cfg: PlanConfig, scores: Scores | None) -> Plan:
    return plan_tensors(model_tensors(model), model, cfg, scores)


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
            score_cfg: ScoreConfig = ScoreConfig(), verify: bool = True,
            progress: bool = True) -> ConvertResult:
    """HF folder -> planned GGUF at ``write_cfg.output``; nothing is left there on failure."""
    t0 = time.time()
    out = write_cfg.output
    check_output(out, write_cfg.force)
    lc = find_llama_cpp()
    cleanup(out)  # what a killed earlier run may have left beside the target
    model = open_model(model_dir)
    try:
        tensors = model_tensors(model)
        if plan_file is not None:
            plan = read_plan(plan_file, tensors)
        else:  # the budget and type names are checked before the (slow) scoring
            make_plan(tensors, model.n_layers, replace(plan_cfg, strategy="random"))
        scores = None
        if plan_file is None or scores_file is not None:
            scores = get_scores(model, scores_file, score_cfg, progress)
        else:
            zd_scores(model, progress)  # the NaN/Inf check reads every weight
        if plan_file is None:
            plan = plan_tensors(tensors, model, plan_cfg, scores)
        partial = write_gguf(lc, model.path, plan, scores, write_cfg, progress)
        if verify:
            check = check_file(lc, partial, plan, score_cfg.calib_file, shown_as=out)
        else:
            check = CheckResult(read_back(partial).bpw, None)
        publish(partial, out)
    except BaseException:
        cleanup(out)
        raise
    return ConvertResult(out, plan, scores, check, time.time() - t0)
