"""lwq_gguf.files and lwq_gguf.llamacpp: atomic outputs, the cache root, the code digest, and a
full disk named only when the disk is full."""

import errno
import os
from pathlib import Path

import pytest

from lwq_gguf.errors import OutputError, ToolError
from lwq_gguf.files import atomic_output, cache_root, code_digest, partial_path
from lwq_gguf.llamacpp import run_tool


def test_atomic_output_is_whole_or_absent(tmp_path):
    out = tmp_path / "x.json"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed midway")
    assert out.read_text() == "old" and not partial_path(out).exists()
    with atomic_output(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and list(tmp_path.iterdir()) == [out]


def test_atomic_output_names_a_full_disk():
    with pytest.raises(OutputError, match="disk full"):
        with atomic_output(Path("/tmp/lwq-test-full.json")):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError):  # any other OSError is not called a full disk
        with atomic_output(Path("/tmp/lwq-test-denied.json")):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_cache_root_rule(monkeypatch, tmp_path):
    monkeypatch.delenv("LWQ_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lwq-gguf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "lwq-gguf"
    monkeypatch.setenv("LWQ_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/lwq-gguf" in makefile  # the same rule


def test_code_digest_covers_the_named_code():
    a, b = code_digest("score"), code_digest("score", "plan")
    assert len(a) == 16 and a != b and a == code_digest("score")
    assert code_digest("quant") != code_digest("quant/types.py")  # the C source counts too
    with pytest.raises(RuntimeError, match="renamed or moved"):  # never skipped silently
        code_digest("score", "write/no_such_module.py")


def test_a_write_failure_is_a_full_disk_only_when_the_disk_is_full(tmp_path):
    out = tmp_path / "o.gguf"
    script = "echo 'llama_model_quantize: failed to write'; exit 1"
    with pytest.raises(ToolError, match="failed to write"):  # plenty of space here
        run_tool(["bash", "-c", script, str(out)], what="a tool", cwd=tmp_path)
    with pytest.raises(OSError) as e:
        run_tool(["bash", "-c", "echo 'write: No space left on device'; exit 1"], what="a tool")
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []
