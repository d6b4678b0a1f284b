"""Compile a C source once into a shared library in the lwq-gguf cache folder.

Both of lwq-gguf's C libraries are built on first use with the system's C compiler
(``$CC``, else ``cc`` or ``gcc``) and kept under :func:`lwq_gguf.files.cache_root`, named by a hash
of their source and flags (and of the CPU, for ``-march=native`` builds), so a changed source is
built again and every run after the first loads the file.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from lwq_gguf.errors import ToolError
from lwq_gguf.files import atomic_output, cache_root


class CompileError(ToolError):
    """The C compiler is missing or failed; the message names the source and the compiler."""


def cpu_identity() -> str:
    """The CPU's model and feature flags (a ``-march=native`` library runs only where built)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return platform.machine() + "|" + "|".join(dict.fromkeys(keep))


def compile_once(stem: str, source: str, flags: Sequence[str], *, origin: str,
                 native: bool = False) -> Path:
    """``<cache>/<stem>-<hash>.so`` built from the C text ``source`` (``origin``: where the text
    comes from, for error messages); ``flags`` go to the compiler after the source file."""
    key = hashlib.sha256("\0".join([source, *flags, cpu_identity() if native else ""]).encode())
    root = cache_root()
    lib = root / f"{stem}-{key.hexdigest()[:16]}.so"
    if lib.is_file():
        return lib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise CompileError(f"{origin}: no C compiler found: install gcc (or set CC)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        src = root / f".{stem}.{os.getpid()}.c"
        src.write_text(source)
        try:
            with atomic_output(lib, unique=True) as tmp:
                r = subprocess.run([cc, str(src), "-o", str(tmp), *flags],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    last = (r.stderr.strip().splitlines() or ["?"])[-1]
                    raise CompileError(f"{origin}: {cc} failed ({last}): fix the compiler")
        finally:
            src.unlink(missing_ok=True)
    except OSError as e:
        raise CompileError(f"{root}: cannot build {stem} there ({e.strerror}): set LWQ_CACHE to "
                           "a writable folder") from None
    return lib
