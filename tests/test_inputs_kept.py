"""No command writes over a file it reads (with or without --force): one error line naming both
paths, the input byte-identical afterwards, nothing written."""

import hashlib
import os
import shutil

import pytest

from conftest import error_line, run_cli
from lwq_gguf.errors import OutputError
from lwq_gguf.files import Reads, check_output


def digest(folder):
    """sha256 of every file under ``folder`` by relative path (what must not change)."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and not f.is_symlink()}


@pytest.fixture
def work(tiny, tmp_path):
    """tmp/model (a private tiny Llama), tmp/c.txt (a calibration text), tmp/A.gguf (a file)."""
    shutil.copytree(tiny("llama", 2), tmp_path / "model")
    (tmp_path / "c.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    (tmp_path / "A.gguf").write_bytes(b"GGUF a recipe the user keeps")
    return tmp_path


def refused(work, *args, names=()):
    """``lwq-gguf ARGS`` ends in one line naming ``names``, with every file under ``work`` as it
    was and no file added."""
    before = digest(work)
    line = error_line(run_cli("-q", *args, cwd=work))
    assert "an input of this command" in line or "the model folder" in line, line
    for name in names:
        assert str(name) in line, (name, line)
    assert digest(work) == before
    return line


def test_convert_never_writes_over_its_inputs(work):
    model = work / "model"
    st = model / "model.safetensors"
    refused(work, "convert", model, "--avg-bits", "4", "-o", st, "--force", names=(st,))
    refused(work, "convert", model, "--recipe", work / "A.gguf", "-o", work / "A.gguf",
            "--force", names=(work / "A.gguf",))
    refused(work, "convert", model, "--avg-bits", "4", "--calib", work / "c.txt", "-o",
            work / "c.txt", "--force", names=(work / "c.txt",))
    refused(work, "convert", model, "--avg-bits", "4", "-o", model / "config.json",
            names=(model / "config.json",))  # without --force: the input, not "already exists"
    refused(work, "convert", model, "--avg-bits", "4", "-o", work / "out.gguf", "--ollama",
            "--modelfile", model / "config.json", "--force", names=(model / "config.json",))


def test_links_are_resolved(work):
    st = work / "model" / "model.safetensors"
    os.symlink(st, work / "sym.gguf")
    os.link(st, work / "hard.gguf")
    refused(work, "convert", work / "model", "--avg-bits", "4", "-o", work / "sym.gguf",
            "--force", names=(work / "sym.gguf", st))
    refused(work, "convert", work / "model", "--avg-bits", "4", "-o", work / "hard.gguf",
            "--force", names=(work / "hard.gguf",))


def test_output_folders_that_are_or_hold_the_model_folder(work):
    model = work / "model"
    refused(work, "convert", model, "--avg-bits", "3", "4", "-o", f"{model}/", names=(model,))
    refused(work, "convert", model, "--avg-bits", "3", "4", "-o", f"{work}/", names=(work,))
    refused(work, "convert", model, "--avg-bits", "4", "-o", f"{model}/", "--card",
            names=(model,))
    refused(work, "compare", model, "--text", work / "c.txt", "-o", model, names=(model,))


def test_score_plan_compare_inspect_never_write_over_their_inputs(work):
    model = work / "model"
    refused(work, "score", model, "-o", model / "config.json", "--force",
            names=(model / "config.json",))
    refused(work, "score", model, "--calib", work / "c.txt", "-o", work / "s.json", "--png",
            work / "c.txt", "--force", names=(work / "c.txt",))
    (work / "S.json").write_text("{}")
    refused(work, "plan", model, "--avg-bits", "4", "--scores", work / "S.json", "-o",
            work / "S.json", "--force", names=(work / "S.json",))
    refused(work, "plan", model, "--avg-bits", "4", "--calib", work / "c.txt",
            "--tensor-type-file", work / "c.txt", "--force", names=(work / "c.txt",))
    (work / "cmp").mkdir()
    (work / "cmp" / "compare.md").write_text("the evaluation text")
    refused(work, "compare", model, "--text", work / "cmp" / "compare.md", "-o", work / "cmp",
            names=(work / "cmp" / "compare.md",))
    refused(work, "inspect", work / "A.gguf", "--png", work / "A.gguf", "--force",
            names=(work / "A.gguf",))


def test_an_imatrix_file_is_an_input(work):
    model = work / "model"
    run_cli("-q", "score", model, "-o", work / "m.scores.json", check=True, cwd=work)
    imatrix = work / "m.imatrix.gguf"
    assert imatrix.is_file()
    refused(work, "convert", model, "--avg-bits", "4", "--imatrix", imatrix, "-o", imatrix,
            "--force", names=(imatrix,))


def test_reads_unit(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"w")
    (tmp_path / "m" / ".git").mkdir()
    (tmp_path / "m" / ".git" / "x").write_bytes(b"x")  # hidden folders are not the model's files
    reads = Reads.of(tmp_path / "m", None, tmp_path / "missing.txt")
    assert [f.name for f in reads.files] == ["w.bin"]
    with pytest.raises(OutputError, match="an input of this command"):
        check_output(tmp_path / "m" / "w.bin", True, reads)
    check_output(tmp_path / "m" / "new.gguf", False, reads)  # a new file beside them is fine
    with pytest.raises(OutputError, match="holds the model folder"):
        reads.check_folder(tmp_path)
    with pytest.raises(OutputError, match="is the model folder"):
        reads.check_folder(tmp_path / "m" / ".." / "m")
    reads.check_folder(tmp_path / "m-out")
    reads.check_folder(tmp_path / "m" / "sub")  # a folder inside the model folder holds no model
