"""A GGUF file's header read back (bounds-checked, the tensor data never read): each tensor's
type, shape and bytes, the lwq.*, general.* and quantize.* metadata, and the file's BPW in
llama.cpp's definition (tensor bytes * 8 / tensor elements)."""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from lwq_gguf.errors import LwqError


@dataclass(frozen=True)
class FileInfo:
    types: dict[str, str]  # tensor name -> lower-case type name
    nbytes: int
    nelements: int
    metadata: dict[str, object]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # ggml order (row length first)
    sizes: dict[str, int] = field(default_factory=dict)  # tensor name -> bytes of its data
    header_bytes: int = 0  # header, metadata and tensor infos (before the aligned data)

    @property
    def bpw(self) -> float:
        return self.nbytes * 8 / self.nelements


# GGUF value types (gguf.GGUFValueType) -> struct format; 8 = string, 9 = array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_META = ("lwq.", "general.", "quantize.")


class _Header:
    """A bounds-checked cursor over a GGUF file's header (little- or big-endian)."""

    def __init__(self, buf):
        self.buf, self.pos, self.end = buf, 0, "<"

    def take(self, fmt: str):
        size = struct.calcsize(self.end + fmt)
        if self.pos + size > len(self.buf):
            raise struct.error("unexpected end of file")
        v = struct.unpack_from(self.end + fmt, self.buf, self.pos)
        self.pos += size
        return v[0] if len(v) == 1 else v

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise struct.error("unexpected end of file")
        self.pos += n

    def string(self) -> str:
        n = self.take("Q")
        start = self.pos
        self.skip(n)
        return bytes(self.buf[start:self.pos]).decode("utf-8", "replace")

    def skip_string(self) -> None:
        self.skip(self.take("Q"))

    def value(self, vtype: int, keep: bool):
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == 8:
            return self.string() if keep else self.skip_string()
        if vtype != 9:
            raise struct.error(f"unknown value type {vtype}")
        etype, count = self.take("I"), self.take("Q")
        if etype in _SCALAR:
            self.skip(count * struct.calcsize(_SCALAR[etype]))
        else:
            for _ in range(count):
                self.value(etype, False)
        return None


def read_back(path: Path, fix: str = "re-create it") -> FileInfo:
    """Tensor types, byte and element counts, and lwq./general./quantize. metadata of a GGUF.

    Reads only the header (gguf-py's GGUFReader parses every vocab string into numpy views,
    seconds per file); sizes come from gguf's GGML_QUANT_SIZES, so BPW is llama.cpp's.
    """
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Header(buf))
    except (struct.error, ValueError, OSError, OverflowError, KeyError) as e:
        raise LwqError(f"{path}: not a readable GGUF file ({e}): {fix}") from None


def _parse(h: _Header) -> FileInfo:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if h.take("4s") != b"GGUF":
        raise ValueError("no GGUF magic")
    if h.take("I") & 0xFFFF == 0:  # written on a big-endian machine
        h.end = ">"
    h.pos = 8
    n_tensors, n_kv = h.take("Q"), h.take("Q")
    meta, align = {}, 32
    for _ in range(n_kv):
        key = h.string()
        vtype = h.take("I")
        v = h.value(vtype, keep=key.startswith(_META) or key == "general.alignment")
        if key == "general.alignment":
            align = int(v) if isinstance(v, int) and v > 0 else 32
        if v is not None and key.startswith(_META):
            meta[key] = v
    types, shapes, sizes, nbytes, nel, extent = {}, {}, {}, 0, 0, 0
    for _ in range(n_tensors):
        name = h.string()
        n_dims = h.take("I")
        if n_dims > 8:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        dims = [h.take("Q") for _ in range(n_dims)]
        ty, offset = GGMLQuantizationType(h.take("I")), h.take("Q")
        block, size = GGML_QUANT_SIZES[ty]
        n = math.prod(dims)
        if n % block:
            raise ValueError(f"tensor {name!r}: {n} elements is not whole {ty.name} blocks")
        types[name], shapes[name], sizes[name] = ty.name.lower(), tuple(dims), n // block * size
        nbytes += n // block * size
        nel += n
        extent = max(extent, offset + n // block * size)
    data_start = -(-h.pos // align) * align
    if data_start + extent > len(h.buf):
        raise ValueError(f"truncated: tensor data needs {data_start + extent} bytes, file has {len(h.buf)}")
    return FileInfo(types, nbytes, nel, meta, shapes, sizes, h.pos)
