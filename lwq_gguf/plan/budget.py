"""Split budgets for mixture-of-experts models run with their experts in host memory.

``llama-server -ot exps=CPU`` (or ``--n-cpu-moe N``) keeps the routed experts (the merged
``ffn_{gate,up,down}_exps`` tensors) in system RAM and everything else - attention, shared
experts, router, norms, embeddings, output - on the GPU. ``--dense-size 3.5GiB`` (or
``--dense-bits 5``: bits per weight over those tensors) bounds that non-expert part, and the
planner minimises the total damage under both limits (:func:`lwq_gguf.plan.knapsack.min_damage_split`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lwq_gguf.errors import PlanError
from lwq_gguf.model.inventory import GGUFTensor

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "t": 1000**4,
          "tb": 1000**4, "tib": 1 << 40}


def parse_size(spec: str, option: str = "--dense-size") -> int:
    """'3.5GiB', '3500MB', '800M', '123456' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(spec))
    unit = m and _UNITS.get(m.group(2).lower())
    if not m or unit is None or float(m.group(1)) <= 0:
        raise PlanError(f"{option} {spec!r}: give a size such as 3.5GiB, 3500MB or 800MiB")
    return int(float(m.group(1)) * unit)


def in_unit_of(n: int, spec: str) -> str:
    """``n`` bytes in the unit ``spec`` was given in ('4.2GiB' -> '3.981GiB'; bytes: '123 B')."""
    m = re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*([a-zA-Z]*)\s*", str(spec))
    unit = m.group(1) if m and m.group(1).lower() in _UNITS and m.group(1).lower() not in (
        "", "b") else ""
    return f"{n / _UNITS[unit.lower()]:.3f}{unit}" if unit else f"{n} B"


# ---- the file around the tensors: what --size must leave room for ------------------------------

ALIGN = 32  # GGUF's default data alignment (general.alignment)
# llama-quantize's quantize.imatrix.* keys, at most: two strings (cut to 127 bytes) and two uint32
IMATRIX_KV_MAX = sum(8 + len(k) + 4 + 8 + 127 for k in ("quantize.imatrix.file",
                                                         "quantize.imatrix.dataset")) + sum(
    8 + len(k) + 4 + 4 for k in ("quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"))


def pad(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def kv_bytes(kv: dict) -> int:
    """GGUF bytes of metadata entries as lwq-gguf writes them (strings, float32, uint32)."""
    return sum(8 + len(k.encode()) + 4 + (8 + len(v.encode()) if isinstance(v, str) else 4)
               for k, v in kv.items())


def file_bytes(header_bytes: int, tensor_bytes: Sequence[int], extra_kv: int) -> int:
    """A GGUF's size on disk, at most: the converter's 16-bit header (its metadata and tensor
    infos), the metadata added to it, then every tensor's data padded to the alignment."""
    return pad(header_bytes + extra_kv) + sum(pad(b) for b in tensor_bytes)


def is_dense(t: GGUFTensor) -> bool:
    """Every tensor but the routed experts (what stays on the GPU with -ot exps=CPU)."""
    return t.experts == 1 and "_exps." not in t.name


def dense_budget(tensors: Sequence[GGUFTensor], dense_bytes: int | None,
                 dense_bits: float | None) -> int | None:
    """The non-expert part's byte limit asked for (None: no limit); refused for a dense model."""
    if dense_bytes is None and dense_bits is None:
        return None
    if all(is_dense(t) for t in tensors):
        raise PlanError("--dense-size/--dense-bits bound the non-expert part of a "
                        "mixture-of-experts model; this model has no routed experts "
                        "(ffn_*_exps): use --avg-bits alone")
    if dense_bytes is not None:
        return dense_bytes
    assert dense_bits is not None  # (one of the two bounds the dense part)
    return int(dense_bits * sum(t.numel for t in tensors if is_dense(t)) / 8)


def gib(n: int) -> str:
    """A size as users read it: GiB from 1 GiB up, else MiB."""
    return f"{n / 2**30:.3f} GiB" if n >= 1 << 30 else f"{n / 2**20:.1f} MiB"
