"""A family of files in one run: ``convert MODEL --avg-bits 2.5 3 3.5 -o OUTDIR/`` (or ``--size``).

Every target is resolved to a job before anything slow runs - a size to its first ``--avg-bits``
(:func:`lwq_gguf.plan.size.size_target`), a target the ladder cannot reach refused then, every
output checked - so bad input writes nothing. Then the targets are converted one by one; the
scores are measured by the first and read from the score cache by the others. A target that
fails (llama.cpp cannot run its file, the disk fills) is reported and the others still run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from lwq_gguf.errors import LwqError, OutputError
from lwq_gguf.files import check_output
from lwq_gguf.model.load import open_model
from lwq_gguf.model.inventory import inventory
from lwq_gguf.pipeline import ConvertResult, Job, convert
from lwq_gguf.plan.size import SizeLimit, size_target
from lwq_gguf.plan.budget import parse_size
from lwq_gguf.plan.plan import check_reach
from lwq_gguf.model.inventory import model_tensors
from lwq_gguf.write.writer import WriteConfig


@dataclass(frozen=True, kw_only=True)
class Target:
    """One file of a family: a BPW (``bits``) or a size on disk (``size`` bytes, as ``spec``)."""

    bits: float | None = None
    size: int | None = None
    spec: str = ""

    @property
    def label(self) -> str:
        """'3.5bpw', '4.2GiB': what the file's name carries."""
        return f"{self.bits:g}bpw" if self.size is None else re.sub(r"\s+", "", self.spec)


def parse_targets(avg_bits, sizes) -> tuple[Target, ...]:
    """--avg-bits B ... or --size S ... (one of the two), duplicates dropped."""
    if avg_bits and sizes:
        raise LwqError("give the targets as --avg-bits or as --size, not both")
    if sizes:
        return tuple(Target(size=parse_size(s, "--size"), spec=s) for s in dict.fromkeys(sizes))
    return tuple(Target(bits=float(b)) for b in dict.fromkeys(avg_bits or ()))


def target_job(job: Job, t: Target) -> Job:
    """``job`` (whose plan is the template) for one target; refused here when out of reach."""
    imatrix = job.imatrix.used
    assert job.plan is not None  # (the template)
    model = open_model(job.model)
    if t.size is not None:
        bits = size_target(inventory(model), SizeLimit(bytes=t.size, spec=t.spec), job.plan,
                           imatrix)
        return replace(job, plan=replace(job.plan, avg_bits=bits), size_limit=t.size,
                       size_spec=t.spec)
    assert t.bits is not None  # (a target is a size or a BPW)
    cfg = replace(job.plan, avg_bits=t.bits)
    check_reach(model_tensors(model), cfg, imatrix=imatrix)
    return replace(job, plan=cfg)


def family_path(out_dir: Path, model: Path, t: Target) -> Path:
    return out_dir / f"{model.resolve().name}-lwq-{t.label}.gguf"


def prepare_family_dir(out_dir: Path) -> None:
    if not out_dir.parent.is_dir():
        raise OutputError(f"{out_dir.parent}: the output folder's parent does not exist: create "
                          "it or choose another -o")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder: a family (several targets) "
                          "is written into a folder; choose another -o")
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the output folder ({e.strerror}): choose "
                          "another -o") from None


@dataclass(frozen=True)
class Outcome:
    target: Target
    path: Path
    result: ConvertResult | None  # None: failed
    error: str = ""


def run_family(job: Job, targets: tuple[Target, ...], write: WriteConfig, *, verify: bool,
               on_done=None) -> list[Outcome]:
    """Convert every target into ``write.output`` (a folder); ``on_done(outcome)`` after each."""
    out_dir = write.output
    write.reads.check_folder(out_dir)
    prepare_family_dir(out_dir)
    jobs = [(t, target_job(job, t), family_path(out_dir, job.model, t)) for t in targets]
    for _, _, path in jobs:
        check_output(path, write.force, write.reads)
    outcomes = []
    for t, tj, path in jobs:
        try:
            r = convert(tj, replace(write, output=path), verify=verify)
            o = Outcome(t, path, r)
        except LwqError as e:
            o = Outcome(t, path, None, str(e))
        except OSError as e:  # (what convert leaves unnamed: the target it was writing)
            o = Outcome(t, path, None, f"{path}: {e.strerror or e}")
        outcomes.append(o)
        if on_done:
            on_done(o)
    return outcomes
