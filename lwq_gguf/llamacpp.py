"""Where the pinned llama.cpp build lives, and how its tools are run.

``make setup`` builds llama.cpp once (vendor/build_llama_cpp.sh, cached outside the clone) and
records the install folder in ``<venv>/lwq-llama-cpp``. ``LWQ_LLAMA_CPP=<folder>`` overrides it.
The folder holds ``src/`` (llama.cpp source: convert_hf_to_gguf.py, gguf-py) and ``bin/``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lwq_gguf.errors import ToolError

_HOW = "run `make setup` in the lwq-gguf checkout, or set LWQ_LLAMA_CPP to a built install folder"


@dataclass(frozen=True)
class LlamaCpp:
    root: Path

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def has_cuda(self) -> bool:
        return any(self.bin.glob("libggml-cuda*"))

    def tool(self, name: str) -> Path:
        exe = self.bin / name
        if not os.access(exe, os.X_OK):
            raise ToolError(f"{exe}: llama.cpp tool missing: {_HOW}")
        return exe


def find_llama_cpp() -> LlamaCpp:
    root = os.environ.get("LWQ_LLAMA_CPP")
    if not root:
        record = Path(sys.prefix) / "lwq-llama-cpp"
        if record.is_file():
            root = record.read_text().strip()
    if not root:
        raise ToolError(f"the pinned llama.cpp build was not found: {_HOW}")
    lc = LlamaCpp(Path(root))
    if not (lc.root / ".done").exists() or not (lc.src / "convert_hf_to_gguf.py").is_file():
        raise ToolError(f"{lc.root}: incomplete llama.cpp install: {_HOW}")
    import gguf.lazy

    if not hasattr(gguf.lazy, "LazyChunkedTensor"):  # only the pinned gguf-py has it
        raise ToolError(f"the installed gguf package is not the pinned llama.cpp's gguf-py: run "
                        f"`pip install {lc.src / 'gguf-py'}` (or `make setup`)")
    return lc


_FULL = re.compile(r"No space left|ENOSPC|File too large|EFBIG|Disk quota exceeded", re.I)
_WRITE_FAILED = re.compile(r"failed to write|write error|requested and \d+ written", re.I)


def _disk_full(out: str, rc: int, cmd: list[str], cwd: Path | None) -> bool:
    """A disk-full cause, and only that: the tool says so (or died of SIGXFSZ), or it says a
    write failed and a folder it writes to has (almost) no free space left."""
    if _FULL.search(out) or rc == -25:  # -25: SIGXFSZ (file size limit)
        return True
    if not _WRITE_FAILED.search(out):
        return False
    folders = {Path(a).parent for a in cmd[1:] if "/" in a} | ({cwd} if cwd else set())
    for d in folders:
        try:
            if d.is_dir() and shutil.disk_usage(d).free < (16 << 20):
                return True
        except OSError:
            pass
    return False


def run_tool(cmd: list[str], *, what: str, on_line: Callable[[str], None] | None = None,
             env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run a llama.cpp tool (or the converter), stream its output lines to ``on_line``.

    Returns the whole output. A non-zero exit raises ToolError with the last meaningful line, or
    OSError(ENOSPC) when the output says the disk filled up, so the caller can name the file.
    """
    full_env = dict(os.environ)
    lib = str(Path(cmd[0]).parent) if Path(cmd[0]).name.startswith("llama-") else None
    if lib:
        full_env["LD_LIBRARY_PATH"] = lib + os.pathsep + full_env.get("LD_LIBRARY_PATH", "")
    full_env.update(env or {})
    lines: list[str] = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=full_env, cwd=cwd)
    except OSError as e:
        raise ToolError(f"{cmd[0]}: cannot start ({e.strerror}): {_HOW}") from None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if on_line:
                on_line(lines[-1])
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    out = "\n".join(lines)
    if rc != 0:
        if _disk_full(out, rc, cmd, cwd):
            raise OSError(28, "No space left on device (or file size limit reached)")
        tail = [ln for ln in lines if ln.strip()][-3:]
        raise ToolError(f"{what} failed (exit {rc}): {' | '.join(tail)[-400:]}")
    return out
