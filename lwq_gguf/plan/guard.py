"""Never worse than llama.cpp's own mix at the same size: the plan set beside the presets.

After planning, :func:`choose` takes every preset ``compare`` offers (Q2_K ... Q8_0, and with an
imatrix IQ2_M ... IQ4_XS) whose file llama-quantize would write within the same budget and whose
every type is one the plan could have chosen (:mod:`lwq_gguf.plan.mixes`), and the one of them
the planner's own estimate (the sum of each tensor's measured damage) rates best:

* none fits, or the plan's estimate is at most ``VERIFY_ABOVE`` x the preset's: the plan;
* the preset's estimate is no higher than the plan's: the preset, whose file is llama-quantize's
  own byte for byte (so the result is that mix, never worse than it);
* in between: the caller writes both, and :func:`measure` runs them against the 16-bit model in llama.cpp on
  the calibration text (``VERIFY_CHUNKS`` chunks of 512 tokens, the text the imatrix and the
  scores came from, never an evaluation text); the lower mean KLD wins.

``VERIFY_ABOVE``: across the quality benches (bench/results/quality*.json) a whole file's measured
KLD ratio to the mix is up to 1.42x its estimated ratio (the demo model's Q3_K_S: 0.411 measured,
0.290 estimated). A plan estimated at 0.7x the mix is thus still below it when measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from lwq_gguf.evaluate.perplexity import EvalConfig, evaluate_many
from lwq_gguf.llamacpp import LlamaCpp
from lwq_gguf.plan.config import Plan, candidates, fixed_type
from lwq_gguf.plan.mixes import estimated_damage, mix_plan
from lwq_gguf.quant.types import default_baselines, mix_needs_imatrix

VERIFY_ABOVE = 0.7
VERIFY_CHUNKS = 16
# --avg-bits B: a preset counts as at that size up to B + MIX_SLACK (llama-quantize prints BPW
# with two decimals; a user who types Q4_K_M's 4.89 means its file)
MIX_SLACK = 0.005


@dataclass(frozen=True, kw_only=True)
class Budget:
    """What the user allowed: --avg-bits (bits per weight over the tensors) or --size (bytes on
    disk, with the file's size predicted by ``file_bytes``)."""

    avg_bits: float | None = None
    size: int | None = None


@dataclass(frozen=True)
class Guard:
    """The outcome: which file was kept, and why."""

    chosen: Plan  # the plan, or the preset's recipe (chosen.mix set)
    mix: str | None = None  # the preset set beside the plan (None: none fits the budget)
    est_plan: float | None = None
    est_mix: float | None = None
    kld_plan: float | None = None  # measured on the calibration text (the in-between case)
    kld_mix: float | None = None
    verify: Plan | None = None  # the preset's recipe, still to be measured (:func:`measure`)
    note: str = ""  # why a measurement did not run

    def line(self) -> str:
        """One line for the summary."""
        if self.mix is None:
            return "none fits this budget with the plan's types: the plan written"
        est = (f"estimated KLD {self.est_plan:.3g} (plan) vs {self.est_mix:.3g}"
               if self.est_plan is not None and self.est_mix is not None else "no estimate")
        won = self.mix if self.chosen.mix else "the plan"
        if self.kld_plan is not None and self.kld_mix is not None:
            return (f"{self.mix} fits and is close ({est}); measured on the calibration text: "
                    f"KLD {self.kld_plan:.5g} (plan) vs {self.kld_mix:.5g}: {won} written")
        if self.chosen.mix:
            return f"{self.mix} fits and the plan is no better ({est}): {won} written"
        if self.note:
            return f"{self.mix} fits and is close ({est}), {self.note}: the plan written"
        return f"the best that fits is {self.mix} ({est}): the plan written"


def fits(plan: Plan, mix: Plan, budget: Budget, file_bytes) -> bool:
    """The preset's file within the user's budget, with only types the plan could have given."""
    for t, ty in zip(plan.tensors, mix.types):
        fixed = fixed_type(t, plan.config)
        if (fixed is not None and ty != fixed) or (fixed is None and ty not in candidates(
                t, plan.config.ladder)):
            return False
    if budget.size is not None:
        return file_bytes(mix) <= budget.size
    return budget.avg_bits is not None and mix.bpw() <= budget.avg_bits + MIX_SLACK


def choose(plan: Plan, recipes: Mapping[str, Mapping[str, str]],
           damage: Mapping[str, Mapping[str, float]], budget: Budget, file_bytes) -> Guard:
    """The plan or a preset (see the module docstring); ``file_bytes(plan)``: a plan's file on
    disk (for ``budget.size``)."""
    est_plan = estimated_damage(plan, damage)
    best: tuple[float, str, Plan] | None = None
    for name, types in recipes.items():
        cand = mix_plan(plan, name, types)
        est = estimated_damage(cand, damage)
        if est is None or not fits(plan, cand, budget, file_bytes):
            continue
        if best is None or est < best[0]:
            best = (est, name, cand)
    if best is None:
        return Guard(plan)
    est_mix, name, cand = best
    g = Guard(plan, name, est_plan, est_mix)
    if est_plan is not None and est_plan <= VERIFY_ABOVE * est_mix:
        return g
    if est_plan is None or est_mix <= est_plan:
        return replace(g, chosen=cand)
    return replace(g, verify=cand)


def offered(imatrix: bool) -> tuple[str, ...]:
    """The presets set beside a plan: compare's, those that need an imatrix only with one."""
    return tuple(m for m in default_baselines(imatrix) if imatrix or not mix_needs_imatrix(m))


def measure(g: Guard, files: tuple[Path, Path], base: Path, text: Path, lc: LlamaCpp,
            progress: bool = True) -> Guard:
    """``files`` (the planned file, the preset's) against the 16-bit model ``base`` on ``text``;
    the lower mean KLD is kept (the plan on a tie)."""
    assert g.verify is not None
    a, b = evaluate_many(list(files), text, lc, EvalConfig(chunks=VERIFY_CHUNKS), base=base,
                         progress=progress)
    assert a.kld_mean is not None and b.kld_mean is not None
    chosen = g.verify if b.kld_mean < a.kld_mean else g.chosen
    return replace(g, chosen=chosen, kld_plan=a.kld_mean, kld_mix=b.kld_mean, verify=None)
