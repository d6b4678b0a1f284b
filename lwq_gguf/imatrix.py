"""Importance matrices in llama.cpp's GGUF imatrix format (what llama-imatrix writes and
llama-quantize ``--imatrix`` reads at the pin: ``NAME.in_sum2`` = per-column sum of squared input
activations, ``NAME.counts`` = tokens seen, and the ``imatrix.*`` metadata)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lwq_gguf.errors import LwqError


@dataclass(frozen=True)
class Imatrix:
    sums: dict[str, np.ndarray]  # GGUF weight name -> sum over tokens of x_j^2 (float64)
    counts: dict[str, int]  # tokens seen
    dataset: str
    chunk_size: int
    chunks: int

    def weights(self, name: str) -> np.ndarray | None:
        """Per-column importance as llama-quantize uses it (mean of x_j^2), or None."""
        if name not in self.sums or not self.counts.get(name):
            return None
        return (self.sums[name] / self.counts[name]).astype(np.float32)


def write_imatrix(im: Imatrix, path: Path) -> None:
    import gguf

    tmp = path.parent / f".{path.name}.partial"
    w = gguf.GGUFWriter(str(tmp), arch="imatrix", use_temp_file=False)
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", [im.dataset])
    w.add_uint32("imatrix.chunk_count", im.chunks)
    w.add_uint32("imatrix.chunk_size", im.chunk_size)
    for name in sorted(im.sums):
        w.add_tensor(f"{name}.in_sum2", im.sums[name].astype(np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[float(im.counts[name])]], dtype=np.float32))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_imatrix(path: Path) -> Imatrix:
    """A GGUF imatrix (llama-imatrix's default format since 2025, or ours)."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise LwqError(f"{path}: not a GGUF imatrix ({e}): make one with llama-imatrix "
                       "(default .gguf output) or use --imatrix auto") from None
    sums, counts = {}, {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, dtype=np.float64).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = int(round(float(np.asarray(t.data).reshape(-1)[0])))
    if not sums or set(sums) != set(counts):
        raise LwqError(f"{path}: no importance-matrix entries (in_sum2/counts pairs): make it with "
                       "llama-imatrix or use --imatrix auto")

    def field(key, default):
        f = r.fields.get(key)
        return f.parts[f.data[0]].tolist()[0] if f is not None else default

    return Imatrix(sums, counts, path.name, int(field("imatrix.chunk_size", 0)),
                   int(field("imatrix.chunk_count", 0)))


def imatrix_to_dict(im: Imatrix) -> dict:
    """JSON-able form (float32 sums, base64) for caching with the scores."""
    import base64

    return {"dataset": im.dataset, "chunk_size": im.chunk_size, "chunks": im.chunks,
            "entries": {k: [im.counts[k], base64.b64encode(v.astype("<f4").tobytes()).decode()]
                        for k, v in sorted(im.sums.items())}}


def imatrix_from_dict(d: dict) -> Imatrix:
    import base64

    sums = {k: np.frombuffer(base64.b64decode(v[1]), dtype="<f4").astype(np.float64)
            for k, v in d["entries"].items()}
    return Imatrix(sums, {k: int(v[0]) for k, v in d["entries"].items()}, d["dataset"],
                   int(d["chunk_size"]), int(d["chunks"]))
