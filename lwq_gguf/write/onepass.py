"""Single-pass writing: each tensor read once, quantized and written, inside the converter child
(``python -m lwq_gguf.write.onepass JOB.json``, job mode ``onepass``: :func:`run_onepass`).

After the pinned ``convert_hf_to_gguf`` has prepared its (lazy) tensors and metadata, every tensor
in its GGUFWriter is replaced by a :class:`Planned` one which, when the writer reaches it,
materializes the converter's 16-bit data, widens it to float32 and quantizes it (row chunks on all
cores) to the planned type with the plan's encoder (:mod:`lwq_gguf.quant.encoder`). With ``--encoder
ggml`` (the pinned ggml's ``ggml_quantize_chunk`` for every type) the result is the file
``llama-quantize --tensor-type-file`` makes from the converter's 16-bit GGUF, byte for byte
(tests/write/test_onepass.py); the default ``lwq`` differs only in the Q4_K blocks. Either way:
tensors in llama-quantize's order (:func:`loader_order`), metadata in its order
(general.quantization_version and general.file_type moved last, then the quantize.imatrix.* keys),
importance weights computed as llama-quantize computes them (float32 sums / float32 count). No 16-bit copy is written to disk, and every weight is
checked for NaN/Inf on the way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lwq_gguf.errors import ModelInputError, PlanError
from lwq_gguf.model.inventory import WRITTEN_MARK, ConverterJob, add_kv, child_main
from lwq_gguf.quant.tensors import as_16bit, as_f32, materialize

CHUNK_ELEMS = 1 << 22  # float32 elements per work item (16 MiB)


@dataclass(frozen=True, kw_only=True)
class QuantizeSettings:
    """What the single-pass writer is told (as data, inside the converter child's job)."""

    types: dict[str, str]  # tensor name -> planned type
    ftype: int  # general.file_type
    encoder: str  # lwq | ggml
    imatrix: str | None = None  # a GGUF imatrix file
    imatrix_name: str | None = None  # the path recorded in quantize.imatrix.file
    threads: int = 0  # 0: all cores


@dataclass(frozen=True)
class _Target:
    """One tensor's destination: its planned type (None: kept as converted), shape, bytes."""

    name: str
    src_type: Any  # gguf.GGMLQuantizationType of the converter's data
    dst_type: str | None
    shape: tuple[int, ...]
    nbytes: int
    imatrix: np.ndarray | None


@dataclass
class _Shared:
    """What every tensor's write uses: the quantizer, the thread pools, the progress callback."""

    quantizer: Any  # quant.encoder.Quantizer
    pool: ThreadPoolExecutor
    prefetch: ThreadPoolExecutor
    on_done: Callable[[str], None]
    workers: int = field(default=1)


class Planned:
    """Stands in for a converter tensor in GGUFWriter; quantizes when the writer asks for bytes."""

    def __init__(self, target: _Target, src, shared: _Shared) -> None:
        self.t, self.src, self.shared = target, src, shared
        self.name = target.name
        self.next: Planned | None = None  # the tensor written after this one
        self.ahead: Future[np.ndarray] | None = None  # its materialization, started while this
        # one is quantized

    @property
    def nbytes(self) -> int:  # GGUFWriter checks it against the TensorInfo
        return self.t.nbytes

    @property
    def shape(self) -> tuple[int, ...]:
        return self.t.shape

    def _eager(self) -> np.ndarray:
        src, self.src = self.src, None  # drop the lazy graph (and its cached intermediates) after
        return materialize(self.name, src)

    def _check(self, f32: np.ndarray) -> None:
        if not np.isfinite(f32).all():
            bad = int(f32.size - np.isfinite(f32).sum())
            raise ModelInputError(f"tensor {self.name!r} has {bad} NaN/Inf values: the checkpoint is "
                                  "damaged; re-download or re-export it")

    def tofile(self, fout) -> None:
        data = self.ahead.result() if self.ahead is not None else self._eager()
        self.ahead = None
        t, sh = self.t, self.shared
        if self.next is not None:  # the converter's work on the next tensor (reading, widening,
            # 16-bit rounding) overlaps the quantization of this one
            self.next.ahead = sh.prefetch.submit(self.next._eager)
        data = as_16bit(data, t.src_type)
        if t.dst_type is None:  # kept as the converter wrote it (norms, planned 16-bit)
            if t.src_type.name in ("F32", "F16", "BF16"):
                self._check(as_f32(data.reshape(-1), t.src_type))
            data.tofile(fout)
            sh.on_done(self.name)
            return
        ne0 = t.shape[-1]
        groups = data.reshape(-1, t.shape[-2] if len(t.shape) > 2 else data.size // ne0, ne0)
        rows_total = data.size // ne0  # at least one work item per thread, at most 16 MiB each
        step = max(1, min(CHUNK_ELEMS // ne0, -(-rows_total // sh.workers)))
        jobs = []
        for g, rows in enumerate(groups):  # one group per expert (the imatrix has one row each)
            im = None if t.imatrix is None else t.imatrix.reshape(len(groups), ne0)[g]
            jobs += [(rows[i:i + step], im) for i in range(0, len(rows), step)]

        def work(job):
            rows, im = job
            f32 = np.ascontiguousarray(as_f32(rows, t.src_type))
            self._check(f32)
            return sh.quantizer.quantize(f32, t.dst_type, im)

        written = 0
        for blob in sh.pool.map(work, jobs):
            fout.write(blob)
            written += len(blob)
        assert written == t.nbytes, (self.name, written, t.nbytes)
        sh.on_done(self.name)


def requantize_writer(writer, job: QuantizeSettings, on_done
                      ) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
    """Make ``writer`` (the converter's GGUFWriter, tensors and metadata prepared) write the
    planned file. Returns the quantizer and read-ahead thread pools; the caller shuts them down
    after writing."""
    import gguf

    from lwq_gguf.llamacpp import find_llama_cpp
    from lwq_gguf.quant.encoder import Quantizer
    from lwq_gguf.quant.imatrix import read_imatrix
    from lwq_gguf.quant.types import QUANT_TYPES

    quantizer = Quantizer(find_llama_cpp(), job.encoder)
    workers = job.threads or os.cpu_count() or 1
    shared = _Shared(quantizer, ThreadPoolExecutor(max_workers=workers),
                     ThreadPoolExecutor(max_workers=1), on_done, workers)
    imatrix = read_imatrix(Path(job.imatrix)) if job.imatrix else None
    if len(writer.tensors) != 1:
        raise ModelInputError("single-pass writer: split output is not supported: use --two-step")
    old = writer.tensors[0]
    new = {}
    order: list[Planned] = []  # in the order written
    for name in sorted(old, key=loader_order):
        ti = old[name]
        shape = tuple(int(d) for d in ti.shape)
        while len(shape) > 1 and shape[0] == 1:  # ggml_n_dims: trailing ne of 1 are not written
            shape = shape[1:]
        want = QUANT_TYPES[job.types[name]]
        dst = None if want.ggml == ti.dtype else job.types[name]
        nbytes = ti.nbytes
        im = imatrix.weights(name) if imatrix is not None else None
        if dst is not None:
            nrows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            nbytes = quantizer.row_size(dst, shape[-1]) * nrows
            n_exp = shape[0] if len(shape) > 2 else 1
            if im is not None and im.size != shape[-1] * n_exp:
                if not name.startswith("token_embd"):
                    raise ModelInputError(f"{job.imatrix}: imatrix size {im.size} is different "
                                          f"from tensor size {shape[-1] * n_exp} for {name}: make "
                                          "the imatrix from this model")
                im = None
            if im is None and QUANT_TYPES[dst].needs_imatrix:
                raise PlanError(f"{name}: {dst} needs importance weights for this tensor, and "
                                f"{job.imatrix or 'no imatrix'} has none: choose a type of "
                                "q2_k or above for it, or give an imatrix that covers it")
        ti_new = gguf.gguf_writer.TensorInfo(shape=shape, dtype=want.ggml if dst else ti.dtype,
                                             nbytes=nbytes)
        planned = Planned(_Target(name, ti.dtype, dst, shape, nbytes, im), ti.tensor, shared)
        ti_new.tensor = planned  # type: ignore[assignment]  # (the writer calls its tofile)
        new[name] = ti_new
        order.append(planned)
    for a, b in zip(order, order[1:]):
        a.next = b
    writer.tensors[0] = new

    kv = writer.kv_data[0]  # llama-quantize: gguf_set_val_* removes the key and appends it
    for key in (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE):
        kv.pop(key, None)
    writer.add_uint32(gguf.Keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION)
    writer.add_uint32(gguf.Keys.General.FILE_TYPE, int(job.ftype))
    if imatrix is not None:  # llama-quantize's kv overrides (strings cut to 127 bytes, uint32)
        writer.add_string("quantize.imatrix.file", _cut(job.imatrix_name or job.imatrix or ""))
        if imatrix.dataset:
            writer.add_string("quantize.imatrix.dataset", _cut(imatrix.dataset))
        writer.add_uint32("quantize.imatrix.entries_count", len(imatrix.sums))
        if imatrix.chunks > 0:
            writer.add_uint32("quantize.imatrix.chunks_count", imatrix.chunks)
    return shared.pool, shared.prefetch


def loader_order(name: str) -> tuple[int, str]:
    """llama-quantize's tensor order: its weights_map is a std::map with weight_name_comparer
    (layer number from ``blk.%d.``, -1 for none, then the name)."""
    m = re.match(r"blk\.([+-]?\d+)", name)
    return (int(m.group(1)) if m else -1, name)


def _cut(s: str) -> str:
    return s.encode()[:127].decode(errors="ignore")


def run_onepass(inst, job: ConverterJob) -> int:
    """The ``onepass`` job in the converter child: ``inst`` (the converter's model) written with
    every tensor quantized as the writer reaches it (settings: ``job.task``, a QuantizeSettings)."""
    w = inst.gguf_writer
    add_kv(w, job.kv)
    inst.prepare_tensors()
    inst.prepare_metadata(vocab_only=False)
    pool, ahead = requantize_writer(w, QuantizeSettings(**job.task),
                                    lambda name: print(f"{WRITTEN_MARK}{name}", flush=True))
    with pool, ahead:
        w.write_header_to_file(path=Path(job.out))
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main({"onepass": run_onepass}))
