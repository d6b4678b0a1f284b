"""One ``convert``, end to end: one file or a family, then what is written beside it.

:func:`release` checks every output before anything slow runs (the GGUF files and each side
output's files), converts (one file through the pipeline, a family through
:func:`~lwq_gguf.publish.family.run_family`), then writes the side outputs of
:data:`SIDE_OUTPUTS` in order. A side output is one module that writes it (``write/ollama.py``,
``publish/compare.py``, ``publish/card.py``) and one :class:`SideOutput` entry here: the files it
will write (checked up front) and the call that writes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from lwq_gguf.errors import LwqError
from lwq_gguf.files import atomic_write_text, check_output
from lwq_gguf.pipeline import Job, convert
from lwq_gguf.publish.compare import CompareConfig
from lwq_gguf.publish.family import Outcome, Target, family_path, run_family
from lwq_gguf.write.writer import WriteConfig


@dataclass(frozen=True, kw_only=True)
class ReleaseConfig:
    """What one ``convert`` makes. One file: ``job`` as it is, written to ``write.output`` (a
    .gguf). A family (``targets``): ``job``'s plan is the template of every target's, written
    into the folder ``write.output``."""

    job: Job
    write: WriteConfig
    targets: tuple[Target, ...] = ()  # a family's targets; () for one file
    verify: bool = True  # llama.cpp loads and runs every file written
    modelfile: Path | None = None  # one file: its Ollama Modelfile
    ollama: bool = False  # a family: FILE.Modelfile beside each file
    evaluate: CompareConfig | None = None  # a family: measured beside llama.cpp's mixes
    card: bool = False  # a family: the model card (README.md and its plots)
    command: str = ""  # the command line, for the card and the evaluation

    @property
    def family(self) -> bool:
        return bool(self.targets)

    def gguf_paths(self) -> tuple[Path, ...]:
        if not self.family:
            return (self.write.output,)
        return tuple(family_path(self.write.output, self.job.model, t) for t in self.targets)


@dataclass
class Released:
    """What a release wrote: every file's outcome (a failed family target has no result), and
    one line per side output file for the user."""

    outcomes: list[Outcome]
    lines: list[str] = field(default_factory=list)
    evaluation: dict | None = None  # the evaluation's compare.json document

    @property
    def written(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result is not None]

    def raise_failures(self, out_dir: Path) -> None:
        failed = [o for o in self.outcomes if o.result is None]
        if failed:
            raise LwqError(f"{len(failed)} of {len(self.outcomes)} targets failed "
                           f"({', '.join(o.target.label for o in failed)}; the others are "
                           f"written in {out_dir}): {failed[0].target.label}: {failed[0].error}")


@dataclass(frozen=True)
class SideOutput:
    """A file (or files) written beside the GGUFs once they are written."""

    name: str
    wanted: Callable[[ReleaseConfig], bool]
    paths: Callable[[ReleaseConfig], tuple[Path, ...]]  # checked before anything slow runs
    write: Callable[[ReleaseConfig, Released], None]  # appends its lines to Released.lines


# ---- the side outputs -------------------------------------------------------------------------

def _modelfile_of(cfg: ReleaseConfig, gguf: Path) -> Path:
    if cfg.family or cfg.modelfile is None:
        return gguf.with_suffix(".Modelfile")
    return cfg.modelfile


def _modelfiles(cfg: ReleaseConfig) -> tuple[Path, ...]:
    return tuple(_modelfile_of(cfg, p) for p in cfg.gguf_paths())


def _write_modelfiles(cfg: ReleaseConfig, done: Released) -> None:
    from lwq_gguf.write.ollama import modelfile_text

    for o in done.written:
        mf = _modelfile_of(cfg, o.path)
        text, notes = modelfile_text(o.path, cfg.job.model, mf)
        atomic_write_text(mf, text, cfg.write.force, cfg.write.reads)
        if not cfg.family:
            done.lines += [f"note: {n}" for n in notes]
        done.lines.append(f"wrote {mf}: ollama create NAME -f {mf}")


def _write_evaluation(cfg: ReleaseConfig, done: Released) -> None:
    from lwq_gguf.publish.compare import run_compare, write_outputs
    from lwq_gguf.report import COMPARE_HEADERS, compare_rows, table

    if not done.written or cfg.evaluate is None:
        return
    compare = replace(cfg.evaluate,
                      files=tuple((f"lwq {o.target.label}", o.path) for o in done.written))
    res = run_compare(compare, progress=cfg.job.progress)
    paths = write_outputs(compare, res, cfg.command)
    done.evaluation = json.loads(paths[0].read_text())
    done.lines += [table(COMPARE_HEADERS, compare_rows(res.rows)),
                   "wrote " + ", ".join(str(p) for p in paths)]


def _card_files(cfg: ReleaseConfig) -> tuple[Path, ...]:
    from lwq_gguf.publish.card import CARD_FILES

    return tuple(cfg.write.output / n for n in CARD_FILES)


def _write_card(cfg: ReleaseConfig, done: Released) -> None:
    from lwq_gguf.llamacpp import find_llama_cpp
    from lwq_gguf.publish.card import CardInput, write_card

    if not done.written:
        return
    job = cfg.job
    readme = write_card(CardInput(
        model=job.model, files=tuple((o.target.label, o.path) for o in done.written),
        command=cfg.command, calib=job.score.calib_file, calib_tokens=job.score.calib_tokens,
        imatrix=job.imatrix.describe(), llama_cpp=find_llama_cpp().root.name,
        evaluation=done.evaluation), cfg.write.output)
    done.lines.append(f"wrote {readme} (the model card)")


# in the order they are written: the card shows the evaluation
SIDE_OUTPUTS = (
    SideOutput("modelfile", lambda c: c.modelfile is not None or (c.family and c.ollama),
               _modelfiles, _write_modelfiles),
    SideOutput("evaluation", lambda c: c.family and c.evaluate is not None, lambda c: (),
               _write_evaluation),
    SideOutput("card", lambda c: c.family and c.card, _card_files, _write_card),
)


# ---- the release ------------------------------------------------------------------------------

def release(cfg: ReleaseConfig, on_done: Callable[[Outcome], None] | None = None) -> Released:
    """Write the file(s) of ``cfg`` and their side outputs; ``on_done(outcome)`` after each
    GGUF. One file's failure raises; a family's failed targets are in the outcomes (the others
    and their side outputs are still written): :meth:`Released.raise_failures`."""
    side = [s for s in SIDE_OUTPUTS if s.wanted(cfg)]
    if cfg.family:
        cfg.write.reads.check_folder(cfg.write.output)
    for s in side:
        for path in s.paths(cfg):
            if cfg.family and not path.parent.is_dir():  # (the family's folder: made later)
                cfg.write.reads.check(path)
            else:
                check_output(path, cfg.write.force, cfg.write.reads)
    if cfg.family:
        outcomes = run_family(cfg.job, cfg.targets, cfg.write, verify=cfg.verify, on_done=on_done)
    else:
        r = convert(cfg.job, cfg.write, verify=cfg.verify)
        outcomes = [Outcome(Target(bits=r.plan.config.avg_bits), r.output, r)]
        if on_done:
            on_done(outcomes[0])
    done = Released(outcomes)
    for s in side:
        s.write(cfg, done)
    return done
