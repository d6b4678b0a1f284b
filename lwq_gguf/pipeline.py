"""The stages composed: score, plan and convert as the CLI (and tests) run them."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from lwq_gguf.errors import LwqError, PlanError
from lwq_gguf.load import HFModel, open_model
from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.plan import Plan, PlanConfig, make_plan
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


def plan_model(model: HFModel, cfg: PlanConfig, scores: Scores | None) -> Plan:
    with tempfile.TemporaryDirectory(prefix="lwq-inv-") as tmp:
        tensors = inventory(find_llama_cpp(), model.path, Path(tmp))
    return make_plan(tensors, model.n_layers, cfg,
                     scores.lim if scores else None, scores.zd if scores else None)


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
        with tempfile.TemporaryDirectory(prefix="lwq-inv-") as tmp:
            tensors = inventory(lc, model.path, Path(tmp))
        if plan_cfg is not None:  # budget and types checked before the (slow) scoring
            make_plan(tensors, model.n_layers, replace(plan_cfg, strategy="random"))
        scores = get_scores(model, scores_file, score_cfg, progress) if (
            plan_file is None or scores_file is not None) else None
        if plan_file is not None:
            try:
                plan = Plan.from_json(plan_file.read_text(), str(plan_file))
            except OSError as e:
                raise PlanError(f"{plan_file}: cannot read plan ({e.strerror})")
            if scores is None:
                zd_scores(model, progress)  # NaN/Inf check
            check_plan_matches(plan, tensors, str(plan_file))
        else:
            assert plan_cfg is not None
            plan = make_plan(tensors, model.n_layers, plan_cfg,
                             scores.lim if scores else None, scores.zd if scores else None)
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
