"""Families (several targets in one run) and --size, with the real pinned llama.cpp."""

import pytest

from conftest import error_line, run_cli
from lwq_gguf.errors import OutputError
from lwq_gguf.pipeline import Job
from lwq_gguf.plan.plan import PlanConfig
from lwq_gguf.publish.family import Target, family_path, run_family
from lwq_gguf.score.scores import ScoreConfig
from lwq_gguf.quant.gguf_file import read_back
from lwq_gguf.write.writer import WriteConfig


@pytest.mark.slow
def test_family_writes_each_target_and_a_failed_one_leaves_the_others(tiny, tmp_path):
    model, out = tiny("llama", 2), tmp_path / "fam"
    job = Job(model=model, score=ScoreConfig(calib_tokens=256), progress=False,
              plan=PlanConfig(avg_bits=4.0, ladder=("k",)))
    targets = (Target(bits=3.5), Target(bits=5.0), Target(bits=6.0))
    blocked = family_path(out, model, targets[1])

    def done(o):  # after the first file: a folder appears where the second is to go
        if o.target == targets[0]:
            blocked.mkdir()

    got = run_family(job, targets, WriteConfig(output=out), verify=True,
                     on_done=done)
    assert [o.result is not None for o in got] == [True, False, True]
    assert "is a folder" in got[1].error
    for o in (got[0], got[2]):
        assert o.path.name == f"{model.name}-lwq-{o.target.label}.gguf"
        assert abs(read_back(o.path).bpw - o.target.bits) <= 0.02
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [got[0].path.name, got[2].path.name, blocked.name])  # no partial files
    with pytest.raises(OutputError):  # existing files are refused before any work
        run_family(job, targets[:1], WriteConfig(output=out), verify=False)


@pytest.mark.slow
def test_size_targets_land_within_half_a_percent(cont_model, tmp_path):
    out = tmp_path / "sizes"
    p = run_cli("-q", "convert", cont_model, "--size", "90MiB", "100MB", "--ladder", "k",
                "--calib-tokens", "512", "-o", out, "--ollama", "--no-card", check=True)
    assert "2 file(s) in" in p.stdout and not (out / "README.md").exists()
    for name, limit in (("90MiB", 90 * 2**20), ("100MB", 100 * 10**6)):
        f = out / f"{cont_model.name}-lwq-{name}.gguf"
        assert limit * 0.995 <= f.stat().st_size <= limit, (name, f.stat().st_size, limit)
        assert f"FROM ./{f.name}" in f.with_suffix(".Modelfile").read_text()
    line = error_line(run_cli("convert", cont_model, "--size", "10MiB", "--ladder", "k",
                              "-o", tmp_path / "x.gguf"))
    assert "--size 10MiB" in line and "MiB to " in line and not (tmp_path / "x.gguf").exists()
    line = error_line(run_cli("convert", cont_model, "--size", "4.2ZB", "-o", tmp_path / "x.gguf"))
    assert "give a size such as" in line
    line = error_line(run_cli("convert", cont_model, "--size", "90MiB", "--avg-bits", "4",
                              "-o", tmp_path / "x.gguf"))
    assert "not both" in line and not (tmp_path / "x.gguf").exists()
    p = run_cli("-q", "plan", cont_model, "--size", "0.1GB", "--ladder", "k",
                "--calib-tokens", "512", check=True)
    assert "BPW" in p.stdout


def test_side_outputs_are_checked_before_any_work(tiny, tmp_path):
    """Every registered side output names its files up front: an existing family Modelfile or
    card is refused (without --force) before anything is scored or written."""
    from lwq_gguf.publish.release import SIDE_OUTPUTS, ReleaseConfig

    assert [s.name for s in SIDE_OUTPUTS] == ["modelfile", "evaluation", "card"]
    model, out = tiny("llama", 2), tmp_path / "fam"
    out.mkdir()
    job = Job(model=model, score=ScoreConfig(calib_tokens=256), progress=False,
              plan=PlanConfig(avg_bits=4.0, ladder=("k",)))
    cfg = ReleaseConfig(job=job, write=WriteConfig(output=out), ollama=True, card=True,
                        targets=(Target(bits=3.5), Target(bits=5.0)))
    wanted = {s.name: s.paths(cfg) for s in SIDE_OUTPUTS if s.wanted(cfg)}
    assert wanted["modelfile"] == tuple(p.with_suffix(".Modelfile") for p in cfg.gguf_paths())
    assert out / "README.md" in wanted["card"] and "evaluation" not in wanted
    taken = cfg.gguf_paths()[1].with_suffix(".Modelfile")
    taken.write_text("mine")
    line = error_line(run_cli("convert", model, "--avg-bits", "3.5", "5", "--ollama", "-o",
                              f"{out}/"))
    assert taken.name in line and "--force" in line
    assert taken.read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [taken.name]
