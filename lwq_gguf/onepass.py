"""Single-pass writing: each tensor read once, quantized and written, inside the converter child.

After the pinned ``convert_hf_to_gguf`` has prepared its (lazy) tensors and metadata, every tensor
in its GGUFWriter is replaced by a :class:`Planned` one which, when the writer reaches it,
materializes the converter's 16-bit data, widens it to float32 and quantizes it (row chunks on all
cores) to the planned type with the plan's encoder (:mod:`lwq_gguf.kquant`). With ``--encoder
ggml`` (the pinned ggml's ``ggml_quantize_chunk`` for every type) the result is the file
``llama-quantize --tensor-type-file`` makes from the converter's 16-bit GGUF, byte for byte
(tests/test_onepass.py); the default ``lwq`` differs only in the Q4_K blocks. Either way:
tensors in llama-quantize's order (:func:`loader_order`), metadata in its order
(general.quantization_version and general.file_type moved last, then the quantize.imatrix.* keys),
importance weights computed as llama-quantize computes them (float32 sums / float32 count). No 16-bit copy is written to disk, and every weight is
checked for NaN/Inf on the way.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lwq_gguf.errors import ModelInputError

CHUNK_ELEMS = 1 << 22  # float32 elements per work item (16 MiB)


def imatrix_weights(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """llama-quantize's load_imatrix: {tensor: float32 weights}, and the quantize.imatrix.* keys."""
    import gguf

    r = gguf.GGUFReader(path)
    sums, counts = {}, {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[:-8]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[:-7]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    weights = {}
    for name, s in sums.items():
        c = counts[name]
        e = s.reshape(len(c), -1).copy()
        for j, n in enumerate(c):
            e[j] = e[j] / np.float32(n) if n > 0 else np.float32(1)
        weights[name] = e.reshape(-1)

    def field(key):
        f = r.get_field(key)
        return None if f is None else f.contents()

    datasets = field("imatrix.datasets") or []
    kv = {"entries": len(weights), "dataset": datasets[0] if datasets else None,
          "chunks": int(field("imatrix.chunk_count") or 0)}
    return weights, kv


def _as_f32(rows: np.ndarray, src_type) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if src_type == Q.BF16:
        return (rows.astype(np.uint32) << 16).view(np.float32)
    if src_type in (Q.F16, Q.F32):
        return rows.astype(np.float32, copy=False)
    raise ModelInputError(f"single-pass writer: source type {src_type.name} is not 16/32-bit float: "
                          "use --two-step")


class Planned:
    """Stands in for a converter tensor in GGUFWriter; quantizes when the writer asks for bytes."""

    def __init__(self, name: str, src, src_type, dst_type, shape: tuple[int, ...], nbytes: int,
                 imatrix: np.ndarray | None, quantizer, pool: ThreadPoolExecutor, on_done) -> None:
        self.name, self.src, self.src_type, self.dst_type = name, src, src_type, dst_type
        self.shape, self.nbytes, self.imatrix = shape, nbytes, imatrix
        self.quantizer, self.pool, self.on_done = quantizer, pool, on_done
        self.next: Planned | None = None  # the tensor written after this one
        self.ahead = None  # its materialization, started while this one is quantized

    def _eager(self) -> np.ndarray:
        from gguf.lazy import LazyNumpyTensor

        src, self.src = self.src, None  # drop the lazy graph (and its cached intermediates) after
        data = LazyNumpyTensor.to_eager(src) if isinstance(src, LazyNumpyTensor) else src
        if not isinstance(data, np.ndarray):
            raise ModelInputError(f"tensor {self.name!r}: the converter streams it in chunks, which "
                                  "the single-pass writer does not take: use --two-step")
        return data

    def _check(self, f32: np.ndarray) -> None:
        if not np.isfinite(f32).all():
            bad = int(f32.size - np.isfinite(f32).sum())
            raise ModelInputError(f"tensor {self.name!r} has {bad} NaN/Inf values: the checkpoint is "
                                  "damaged; re-download or re-export it")

    def tofile(self, fout) -> None:
        data = self.ahead.result() if self.ahead is not None else self._eager()
        self.ahead = None
        if self.next is not None:  # the converter's work on the next tensor (reading, widening,
            # 16-bit rounding) overlaps the quantization of this one
            self.next.ahead = self.prefetch.submit(self.next._eager)
        if self.src_type.name == "BF16" and data.dtype == np.uint8:  # gguf-py hands BF16 as bytes
            data = np.ascontiguousarray(data).view(np.uint16)
        if self.dst_type is None:  # kept as the converter wrote it (norms, planned 16-bit)
            if self.src_type.name in ("F32", "F16", "BF16"):
                self._check(_as_f32(data.reshape(-1), self.src_type))
            data.tofile(fout)
            self.on_done(self.name)
            return
        ne0 = self.shape[-1]
        groups = data.reshape(-1, self.shape[-2] if len(self.shape) > 2 else data.size // ne0, ne0)
        rows_total = data.size // ne0  # at least one work item per thread, at most 16 MiB each
        step = max(1, min(CHUNK_ELEMS // ne0, -(-rows_total // self.pool._max_workers)))
        jobs = []
        for g, rows in enumerate(groups):  # one group per expert (the imatrix has one row each)
            im = None if self.imatrix is None else self.imatrix.reshape(len(groups), ne0)[g]
            jobs += [(rows[i:i + step], im) for i in range(0, len(rows), step)]

        def work(job):
            rows, im = job
            f32 = np.ascontiguousarray(_as_f32(rows, self.src_type))
            self._check(f32)
            return self.quantizer.quantize(f32, self.dst_type, im)

        written = 0
        for blob in self.pool.map(work, jobs):
            fout.write(blob)
            written += len(blob)
        assert written == self.nbytes, (self.name, written, self.nbytes)
        self.on_done(self.name)


def requantize_writer(writer, types: dict[str, str], ftype: int, imatrix: Path | None,
                      imatrix_name: str | None, threads: int, encoder: str, on_done
                      ) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
    """Make ``writer`` (the converter's GGUFWriter, tensors and metadata prepared) write the
    planned file. Returns the quantizer and read-ahead thread pools; the caller shuts them down
    after writing."""
    import gguf

    from lwq_gguf.kquant import Quantizer
    from lwq_gguf.llamacpp import find_llama_cpp
    from lwq_gguf.quants import QUANT_TYPES

    quantizer = Quantizer(find_llama_cpp(), encoder)
    pool = ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1)
    prefetch = ThreadPoolExecutor(max_workers=1)
    weights, ikv = imatrix_weights(imatrix) if imatrix else ({}, {})
    if len(writer.tensors) != 1:
        raise ModelInputError("single-pass writer: split output is not supported: use --two-step")
    old = writer.tensors[0]
    new = {}
    for name in sorted(old, key=loader_order):
        ti = old[name]
        shape = tuple(int(d) for d in ti.shape)
        while len(shape) > 1 and shape[0] == 1:  # ggml_n_dims: trailing ne of 1 are not written
            shape = shape[1:]
        want = QUANT_TYPES[types[name]]
        dst = None if want.ggml == ti.dtype else types[name]
        nbytes = ti.nbytes
        im = weights.get(name)
        if dst is not None:
            nrows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            nbytes = quantizer.row_size(types[name], shape[-1]) * nrows
            n_exp = shape[0] if len(shape) > 2 else 1
            if im is not None and im.size != shape[-1] * n_exp:
                if not name.startswith("token_embd"):
                    raise ModelInputError(f"{imatrix}: imatrix size {im.size} is different from "
                                          f"tensor size {shape[-1] * n_exp} for {name}: make the "
                                          "imatrix from this model")
                im = None
        ti_new = gguf.gguf_writer.TensorInfo(shape=shape, dtype=want.ggml if dst else ti.dtype,
                                             nbytes=nbytes)
        ti_new.tensor = Planned(name, ti.tensor, ti.dtype, dst, shape, nbytes, im, quantizer, pool,
                                on_done)
        ti_new.tensor.prefetch = prefetch
        new[name] = ti_new
    order = [ti.tensor for ti in new.values()]
    for a, b in zip(order, order[1:]):
        a.next = b
    writer.tensors[0] = new

    kv = writer.kv_data[0]  # llama-quantize: gguf_set_val_* removes the key and appends it
    for key in (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE):
        kv.pop(key, None)
    writer.add_uint32(gguf.Keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION)
    writer.add_uint32(gguf.Keys.General.FILE_TYPE, int(ftype))
    if imatrix:  # llama-quantize's kv overrides (strings cut to 127 bytes, counts as uint32)
        writer.add_string("quantize.imatrix.file", _cut(imatrix_name or str(imatrix)))
        if ikv["dataset"] is not None:
            writer.add_string("quantize.imatrix.dataset", _cut(ikv["dataset"]))
        writer.add_uint32("quantize.imatrix.entries_count", ikv["entries"])
        if ikv["chunks"] > 0:
            writer.add_uint32("quantize.imatrix.chunks_count", ikv["chunks"])
    return pool, prefetch


def loader_order(name: str) -> tuple[int, str]:
    """llama-quantize's tensor order: its weights_map is a std::map with weight_name_comparer
    (layer number from ``blk.%d.``, -1 for none, then the name)."""
    m = re.match(r"blk\.([+-]?\d+)", name)
    return (int(m.group(1)) if m else -1, name)


def _cut(s: str) -> str:
    return s.encode()[:127].decode(errors="ignore")
