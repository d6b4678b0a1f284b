"""What ``score`` and ``plan`` write: their files named, refused before any work, then written.

:func:`write_scores` (``lwq-gguf score``): the scores JSON, the layer-score plot and the imatrix
GGUF that llama-quantize can take (``--imatrix``). :func:`write_plan` (``lwq-gguf plan``): the plan
JSON and llama-quantize's ``--tensor-type-file``. Each checks all of its outputs first (an input
of the command, an existing file without ``force``), so a refused output costs no scoring pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lwq_gguf.files import Reads, atomic_write_text, check_output
from lwq_gguf.pipeline import Job, Prepared, prepare


@dataclass(frozen=True, kw_only=True)
class ScoreFiles:
    """``score``'s outputs: the scores JSON, its plot and (with sensitivity) the imatrix."""

    scores: Path
    png: Path
    imatrix: Path | None  # None: no sensitivity pass, so no imatrix

    @classmethod
    def named(cls, model: Path, output: Path | None = None, png: Path | None = None,
              sensitivity: bool = True) -> ScoreFiles:
        """MODEL.scores.json, MODEL.scores.png and MODEL.imatrix.gguf unless named otherwise
        (the plot and imatrix beside ``output``)."""
        out = output or Path(f"{model.resolve().name}.scores.json")
        stem = out.name.removesuffix(".json").removesuffix(".scores")
        return cls(scores=out, png=png or out.with_suffix(".png"),
                   imatrix=out.with_name(stem + ".imatrix.gguf") if sensitivity else None)

    def paths(self) -> tuple[Path, ...]:
        return (self.scores, self.png) + ((self.imatrix,) if self.imatrix else ())


def write_scores(job: Job, files: ScoreFiles, force: bool, reads: Reads) -> Prepared:
    """Score the model of ``job`` and write ``files``; returns what was prepared."""
    from lwq_gguf.quant.imatrix import imatrix_from_dict, write_imatrix
    from lwq_gguf.score.layers import plot_scores

    for path in files.paths():
        check_output(path, force, reads)
    p = prepare(job)
    atomic_write_text(files.scores, p.scored.to_json(), force, reads)
    if files.imatrix and p.scored.imatrix:
        write_imatrix(imatrix_from_dict(p.scored.imatrix), files.imatrix)
    plot_scores(p.scored, files.png, f"{job.model.name}: layer importance")
    return p


def write_plan(job: Job, output: Path | None, tensor_type_file: Path | None, force: bool,
               reads: Reads) -> Prepared:
    """Plan the model of ``job``; write the plan JSON to ``output`` and llama-quantize's
    ``--tensor-type-file`` to ``tensor_type_file`` (each when given)."""
    outs = [p for p in (output, tensor_type_file) if p]
    for path in outs:
        check_output(path, force, reads)
    p = prepare(job)
    if output:
        atomic_write_text(output, p.planned.to_json(), force, reads)
    if tensor_type_file:
        atomic_write_text(tensor_type_file, p.planned.tensor_type_file(), force, reads)
    return p
