"""What score and plan write: the names, and every output refused before any work."""

from pathlib import Path

import pytest

from lwq_gguf.errors import OutputError
from lwq_gguf.files import Reads
from lwq_gguf.pipeline import Job
from lwq_gguf.plan.plan import PlanConfig
from lwq_gguf.publish.outputs import ScoreFiles, write_plan, write_scores


def test_score_files_are_named_from_the_model_or_the_output(tmp_path):
    f = ScoreFiles.named(tmp_path / "My-Model")
    assert f.paths() == (Path("My-Model.scores.json"), Path("My-Model.scores.png"),
                         Path("My-Model.imatrix.gguf"))
    f = ScoreFiles.named(tmp_path / "m", tmp_path / "out" / "x.scores.json", sensitivity=False)
    assert f.paths() == (tmp_path / "out" / "x.scores.json", tmp_path / "out" / "x.scores.png")
    assert ScoreFiles.named(tmp_path, Path("s.json"), Path("p.png")).paths() == (
        Path("s.json"), Path("p.png"), Path("s.imatrix.gguf"))


def test_outputs_are_refused_before_the_model_is_opened(tmp_path):
    """The model does not exist: reaching it would be a model error, not the output's."""
    (tmp_path / "taken.json").write_text("{}")
    job = Job(model=tmp_path / "no-such-model", plan=PlanConfig(avg_bits=4.0))
    with pytest.raises(OutputError, match="taken.json"):
        write_plan(job, None, tmp_path / "taken.json", force=False, reads=Reads())
    files = ScoreFiles.named(job.model, tmp_path / "s.scores.json", tmp_path / "taken.json")
    with pytest.raises(OutputError, match="taken.json"):
        write_scores(job, files, force=False, reads=Reads())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.json"]
