"""Importance matrices: llama.cpp's GGUF imatrix format (what ``llama-imatrix`` writes and
``llama-quantize --imatrix`` reads at the pin: ``NAME.in_sum2`` = per-column sums of squared
input activations, one row per expert; ``NAME.counts`` = tokens seen, one per expert; and the
``imatrix.*`` metadata), and ``--imatrix none|auto|FILE`` as one value, :class:`ImatrixChoice`."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lwq_gguf.errors import LwqError
from lwq_gguf.files import atomic_output, sha256_file

_FIX = "make one with llama-imatrix (default .gguf output) or use --imatrix auto"


@dataclass(frozen=True, eq=False)
class Imatrix:
    sums: dict[str, np.ndarray]  # GGUF weight name -> sums of x_j^2 over tokens (experts' rows in turn)
    counts: dict[str, np.ndarray]  # tokens seen, one entry per expert (one for a dense weight)
    dataset: str  # "" when the file names none
    chunk_size: int
    chunks: int

    def weights(self, name: str) -> np.ndarray | None:
        """Per-column importance exactly as llama-quantize's load_imatrix computes it: each
        expert's sums divided by its count (1 where it saw no token), float32; None if absent."""
        if name not in self.sums:
            return None
        c = np.asarray(self.counts[name]).reshape(-1)
        rows = self.sums[name].reshape(len(c), -1)
        out = np.ones(rows.shape, dtype=np.float32)
        for j, n in enumerate(c):
            if n > 0:
                out[j] = rows[j] / (np.float32(n) if rows.dtype == np.float32 else n)
        return out.reshape(-1)


def write_imatrix(im: Imatrix, path: Path) -> None:
    import gguf

    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="imatrix", use_temp_file=False)
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", [im.dataset])
        w.add_uint32("imatrix.chunk_count", im.chunks)
        w.add_uint32("imatrix.chunk_size", im.chunk_size)
        for name in sorted(im.sums):
            c = np.asarray(im.counts[name], dtype=np.float32).reshape(-1)
            w.add_tensor(f"{name}.in_sum2", im.sums[name].astype(np.float32).reshape(len(c), -1))
            w.add_tensor(f"{name}.counts", c.reshape(len(c), 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def read_imatrix(path: Path) -> Imatrix:
    """A GGUF imatrix (llama-imatrix's default format since 2025, or ours), float32 as stored."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
        sums, counts = {}, {}
        for t in r.tensors:
            if np.asarray(t.data).size != int(t.n_elements):
                raise ValueError(f"tensor {t.name!r} is cut short")
            if t.name.endswith(".in_sum2"):
                sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
            elif t.name.endswith(".counts"):
                counts[t.name[: -len(".counts")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)

        def field(key, default):
            f = r.get_field(key)
            return default if f is None else f.contents()

        datasets = field("imatrix.datasets", [])
        dataset = datasets[0] if isinstance(datasets, list) and datasets else ""
        chunk_size, chunks = int(field("imatrix.chunk_size", 0)), int(field("imatrix.chunk_count", 0))
    except (ValueError, OSError, IndexError, TypeError, KeyError) as e:
        raise LwqError(f"{path}: not a GGUF imatrix ({e}): {_FIX}") from None
    if not sums or set(sums) != set(counts):
        raise LwqError(f"{path}: no importance-matrix entries (in_sum2/counts pairs): {_FIX}")
    for name, c in counts.items():
        if c.size == 0 or sums[name].size % c.size or not np.isfinite(sums[name]).all():
            raise LwqError(f"{path}: entry {name!r} is malformed (sums and counts disagree, or "
                           f"NaN): {_FIX}")
    return Imatrix(sums, counts, str(dataset), chunk_size, chunks)


def imatrix_to_dict(im: Imatrix) -> dict:
    """JSON-able form (float32 sums, base64) for caching with the scores."""
    return {"dataset": im.dataset, "chunk_size": im.chunk_size, "chunks": im.chunks,
            "entries": {k: [np.asarray(im.counts[k]).reshape(-1).tolist(),
                            base64.b64encode(v.astype("<f4").tobytes()).decode()]
                        for k, v in sorted(im.sums.items())}}


def imatrix_from_dict(d: dict) -> Imatrix:
    sums = {k: np.frombuffer(base64.b64decode(v[1]), dtype="<f4").astype(np.float64)
            for k, v in d["entries"].items()}
    counts = {k: np.asarray(v[0] if isinstance(v[0], list) else [v[0]], dtype=np.int64)
              for k, v in d["entries"].items()}
    return Imatrix(sums, counts, d["dataset"], int(d["chunk_size"]), int(d["chunks"]))


@dataclass(frozen=True, kw_only=True)
class ImatrixChoice:
    """``--imatrix none|auto|FILE``, parsed once at the edge and handed down as this one value.

    ``auto``: computed from the calibration text with the scores (used for planning and
    quantizing); ``none``; ``file``: a llama-imatrix file, identified by its sha256 and read
    once, here (``data``); child processes get the path.
    """

    mode: str = "auto"  # none | auto | file
    path: Path | None = None
    sha256: str | None = None
    data: Imatrix | None = field(default=None, compare=False, repr=False)  # a file's contents

    @classmethod
    def parse(cls, spec: str | Path | None) -> ImatrixChoice:
        spec = "none" if spec is None else str(spec)
        if spec in ("none", "auto"):
            return cls(mode=spec)
        path = Path(spec)
        if not path.is_file():
            raise LwqError(f"{path}: imatrix file not found: {_FIX}, or none")
        data = read_imatrix(path)  # refused here, before any slow work, when it is not an imatrix
        try:
            digest = sha256_file(path)
        except OSError as e:
            raise LwqError(f"{path}: cannot read the imatrix ({e.strerror}): {_FIX}") from None
        return cls(mode="file", path=path, sha256=digest, data=data)

    @property
    def used(self) -> bool:
        """Whether the files are quantized with an imatrix (types that need one are usable)."""
        return self.mode != "none"

    @property
    def key(self) -> str:
        """The name of this setting in the sensitivity tables: none | auto | file:<sha256[:16]>."""
        return f"file:{(self.sha256 or '')[:16]}" if self.mode == "file" else self.mode

    def given(self) -> dict[str, Imatrix]:
        """{key: the file's imatrix} for a file, else {}."""
        if self.mode != "file" or self.path is None:
            return {}
        return {self.key: self.data if self.data is not None else read_imatrix(self.path)}

    def file_for_llama(self, auto: dict | None, path: Path) -> Path | None:
        """The imatrix file that llama.cpp and the writer read: a given file as it is; for
        ``auto`` the scores' imatrix (``auto``, as Scores.imatrix stores it) written to ``path``
        (its folder made if need be); None without one."""
        if self.mode == "file":
            return self.path
        if self.mode == "auto":
            assert auto is not None, "--imatrix auto without the scores' imatrix"
            path.parent.mkdir(exist_ok=True)
            write_imatrix(imatrix_from_dict(auto), path)
            return path
        return None

    def describe(self) -> str:
        return {"none": "no imatrix", "auto": "imatrix from the calibration text"}.get(
            self.mode, f"imatrix {self.path.name if self.path else '?'}")
