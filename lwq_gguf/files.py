"""Files, one helper each: atomic outputs, refusing outputs early, hashing, the cache folder and
the digest of lwq-gguf's own code (what cache entries are keyed by).

Every output lwq-gguf writes goes through :func:`atomic_output`: written beside the target under a
temporary name and renamed onto it only when complete, so a failed, interrupted or killed run
never leaves a partial or clobbered file at the target path.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lwq_gguf.errors import LwqError, OutputError

_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
PACKAGE = Path(__file__).resolve().parent


def is_disk_full(e: OSError) -> bool:
    return e.errno in _DISK_FULL


def disk_full(path: Path, e: OSError) -> OutputError:
    return OutputError(f"{path}: disk full or file size limit reached while writing "
                       f"({e.strerror}): free space in {path.parent} and run again; nothing was "
                       "left behind")


def same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are one file on disk (symlinks and hard links resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (or cannot be reached): not the same file
        return False


@dataclass(frozen=True, kw_only=True)
class Reads:
    """What a command reads: its files (every file of a model folder, --recipe, --plan,
    --scores, --imatrix FILE, --calib, the evaluation text, ...) and its model folders.

    No output may be one of those files (with or without --force: --force replaces an earlier
    output, never an input), and no output folder may be a model folder or hold one."""

    files: tuple[Path, ...] = ()
    folders: tuple[Path, ...] = ()

    @classmethod
    def of(cls, *paths: Path | str | None) -> Reads:
        """The files and folders of ``paths`` (None and missing paths are skipped: the command
        reports those itself); a folder brings every file under it, hidden folders left out."""
        files, folders = [], []
        for p in (Path(x) for x in paths if x is not None):
            if p.is_dir():
                folders.append(Path(os.path.realpath(p)))
                for root, dirs, names in os.walk(p):
                    dirs[:] = [d for d in dirs if not d.startswith(".")]
                    files += [Path(root) / n for n in names]
            elif p.exists():
                files.append(p)
        return cls(files=tuple(files), folders=tuple(folders))

    def check(self, output: Path) -> None:
        for f in self.files:
            if same_file(output, f):
                what = "is" if str(f) == str(output) else f"is the same file as {f},"
                raise OutputError(f"{output}: {what} an input of this command: choose another "
                                  "output path (--force replaces an earlier output, never an "
                                  "input)")

    def check_folder(self, folder: Path) -> None:
        real = Path(os.path.realpath(folder))
        for d in self.folders:
            if d == real or real in d.parents:
                what = "is" if d == real else "holds"
                raise OutputError(f"{folder}: {what} the model folder {d}, which this command "
                                  "reads: write into another folder")


def check_output(output: Path, force: bool, reads: Reads = Reads()) -> None:
    """Refuse before any work: an input of the command (:class:`Reads`), an existing target
    without --force, a missing or unwritable folder."""
    reads.check(output)
    folder = output.parent
    if output.is_dir():
        raise OutputError(f"{output}: is a folder: give a file name such as {output}/model.gguf")
    if output.exists() and not force:
        raise OutputError(f"{output}: already exists: pass --force to replace it")
    if not folder.is_dir():
        raise OutputError(f"{folder}: output folder does not exist: create it first")
    try:  # a real probe: permission bits say nothing for root or read-only mounts
        fd, probe = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{folder}: output folder is not writable ({e.strerror}): choose another "
                          "path") from None


def partial_path(path: Path) -> Path:
    """Where :func:`atomic_output` writes ``path`` before the rename (beside it)."""
    return path.parent / f".{path.name}.partial"


@contextmanager
def atomic_output(path: Path, *, unique: bool = False) -> Iterator[Path]:
    """``with atomic_output(p) as tmp: write tmp`` -> ``p`` appears complete, or not at all.

    ``unique``: a per-process temporary name (for shared caches several runs may fill at once).
    A full disk becomes one :class:`OutputError` naming ``path``; the temporary file is removed
    on every failure.
    """
    tmp = (path.with_name(f".{path.name}.{os.getpid()}.tmp") if unique else partial_path(path))
    try:
        tmp.unlink(missing_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path, e) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str, force: bool = True, reads: Reads = Reads()) -> None:
    """A small text output (JSON, tensor-type file), written atomically; refused like any output."""
    check_output(path, force, reads)
    try:
        with atomic_output(path) as tmp:
            tmp.write_text(text)
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror}): choose another path") from None


def read_user_text(path: Path, what: str, fix: str, error: type[LwqError] = LwqError) -> str:
    """The text of a file the user named; unreadable or not text -> one ``error`` line."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or "not text"
        raise error(f"{path}: cannot read {what} ({why}): {fix}") from None


def write_cache_text(path: Path, text: str) -> bool:
    """A cache entry, written atomically; False (and nothing left) when the cache is unwritable
    or full: a cache only ever costs time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, unique=True) as tmp:
            tmp.write_text(text)
        return True
    except (OSError, OutputError):
        return False


def _memo_entry(path: Path, memo: Path) -> Path:
    st = path.stat()
    ident = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return memo / hashlib.sha256(ident.encode()).hexdigest()[:32]


def _read_memo(entry: Path) -> str | None:
    try:
        known = entry.read_text().strip()
    except OSError:
        return None
    return known if len(known) == 64 and all(c in "0123456789abcdef" for c in known) else None


def remembered_sha256(path: Path, memo: Path) -> str | None:
    """The sha256 :func:`sha256_file` remembered for this file as it is now, or None."""
    try:
        return _read_memo(_memo_entry(path, memo))
    except OSError:  # (the file itself cannot be read)
        return None


def sha256_file(path: Path, memo: Path | None = None) -> str:
    """sha256 of a file's bytes; with ``memo`` (a folder) remembered by (path, size, mtime), so a
    large file is read in full once."""
    entry = None
    if memo is not None:
        entry = _memo_entry(path, memo)
        known = _read_memo(entry)
        if known is not None:
            return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    digest = h.hexdigest()
    if entry is not None:
        write_cache_text(entry, digest)
    return digest


def cache_root() -> Path:
    """lwq-gguf's cache folder: ``$LWQ_CACHE``, else ``$XDG_CACHE_HOME/lwq-gguf``, else
    ``~/.cache/lwq-gguf`` (the same rule as the Makefile and vendor/build_llama_cpp.sh)."""
    if os.environ.get("LWQ_CACHE"):
        return Path(os.environ["LWQ_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lwq-gguf"


def scores_cache_dir() -> Path:
    """The score cache and the converter's tensor lists: ``$LWQ_SCORES_CACHE``, else
    ``cache_root()/scores``."""
    env = os.environ.get("LWQ_SCORES_CACHE")
    return Path(env) if env else cache_root() / "scores"


def sha256_memo() -> Path:
    """Where file digests are remembered by (path, size, mtime) (see :func:`sha256_file`)."""
    return scores_cache_dir() / "sha256"


def code_digest(*parts: str) -> str:
    """sha256 (16 hex) of lwq-gguf's source files under ``parts`` (sub-packages or files of the
    package, e.g. ``"score"``, ``"quant"``): a cache entry keyed by it is never reused once the
    code that made it changes."""
    h = hashlib.sha256()
    for part in parts:
        root = PACKAGE / part
        if not root.exists():  # a renamed module would otherwise drop out of the key silently
            raise RuntimeError(f"code_digest: lwq_gguf/{part} does not exist (renamed or moved?)")
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for f in files:
            if f.is_file() and f.suffix in (".py", ".c"):
                h.update(f"{f.relative_to(PACKAGE)}\n".encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]
