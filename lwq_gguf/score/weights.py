"""Sensitivity from weight error alone, for the architectures lwq-gguf runs no forward pass of.

llama.cpp's converter knows far more architectures than lwq-gguf's table
(:mod:`lwq_gguf.model.arch`). For those, the damage of type q on tensor t is

    damage(t, q) = sum_rows sum_j a_j * (w - Q_q(w))_j^2

with ``a_j`` the importance matrix's mean squared input of column j (an expert's own, for merged
experts) when the user gives one (``--imatrix FILE``: llama-imatrix runs every architecture
llama.cpp does), else 1. That is the squared output error per token were the inputs uncorrelated:
not a KL-divergence, so plans made from it are labelled "weight error" wherever they are shown.

It is computed inside the converter child (``python -m lwq_gguf.score.weights JOB.json``, job
``damage``: :func:`run_damage`) on the tensors
exactly as the converter writes them, on a fixed uniform sample of rows (score.sample.UNIFORM:
without a Fisher there is no row's gradient to draw the rows by).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.model.inventory import WRITTEN_MARK, ConverterJob, GGUFTensor, child_main
from lwq_gguf.quant.encoder import Quantizer, split_damage_key
from lwq_gguf.quant.imatrix import read_imatrix
from lwq_gguf.quant.tensors import as_16bit, as_f32, materialize
from lwq_gguf.quant.types import legal_types, usable_ladder
from lwq_gguf.score.sample import UNIFORM
from lwq_gguf.score.scores import sig6
from lwq_gguf.score.sweeps import tensor_damage

BASIS_FISHER = "expected KLD (Fisher)"
BASIS_WEIGHTS = "weight error (no forward pass)"


@dataclass(frozen=True, kw_only=True)
class WeightDamageJob:
    """The damage tables to make (as data, inside the converter child's job)."""

    ladder: tuple[str, ...]
    keys: tuple[str, ...]  # damage keys (quant.encoder.damage_key): "none" or a given imatrix
    imatrix_files: dict[str, str]  # imatrix key -> its file

    def task(self) -> dict:
        """As a ConverterJob's ``task`` (data)."""
        return asdict(self)

    @classmethod
    def from_task(cls, d: dict) -> WeightDamageJob:
        return cls(ladder=tuple(d["ladder"]), keys=tuple(d["keys"]),
                   imatrix_files=dict(d["imatrix_files"]))


class WeightDamage:
    """Feeds on the converter's tensors one at a time; ``tables`` holds the result."""

    def __init__(self, job: WeightDamageJob, lc) -> None:
        self.job = job
        self.quantizers = {enc: Quantizer(lc, enc)
                           for enc in {split_damage_key(k)[1] for k in job.keys}}
        files = {key: read_imatrix(Path(f)) for key, f in job.imatrix_files.items()}
        self.modes = {k: files.get(split_damage_key(k)[0]) for k in job.keys}
        self.tables: dict[str, dict[str, dict[str, float]]] = {k: {} for k in job.keys}

    def add(self, t: GGUFTensor, data: np.ndarray) -> None:
        """``data``: the tensor as float32, ggml shape reversed ([experts,] rows, cols)."""
        cols = data.shape[-1]
        rows = data.reshape(-1, cols)
        keep = UNIFORM.rows(len(rows), cols, vocab=t.layer is None)
        w = np.ascontiguousarray(rows[keep])
        experts = keep // (len(rows) // t.experts) if t.experts > 1 else None
        types = legal_types(self.job.ladder, t.shape[0])
        scale = len(rows) / len(keep)
        for key, im in self.modes.items():
            a = im.weights(t.name) if im is not None else None
            if a is None or a.size not in (cols, cols * t.experts):
                a, weight = None, np.ones_like(w)
            else:
                per_row = a.reshape(-1, cols)
                weight = np.broadcast_to(per_row[experts] if per_row.shape[0] > 1
                                         else per_row, w.shape)
            quantizer = self.quantizers[split_damage_key(key)[1]]
            usable = usable_ladder(tuple(types), a is not None)
            d = tensor_damage(quantizer, w, weight, usable, a, experts)
            # tensor_damage is 1/2 sum F e^2 (a KLD expansion); the weight error has no 1/2
            self.tables[key][t.name] = {ty: sig6(2 * v * scale) for ty, v in d.items()}


def run_damage(inst, job: ConverterJob) -> int:
    """The ``damage`` job in the converter child: the tables of every quantizable tensor of
    ``inst`` (the converter's model) as it makes them, written as JSON to ``job.out``."""
    inst.prepare_tensors()
    tables = WeightDamage(WeightDamageJob.from_task(job.task), find_llama_cpp())
    for shard in inst.gguf_writer.tensors:
        for name, ti in shard.items():
            t = GGUFTensor(name, tuple(int(d) for d in reversed(ti.shape)), ti.dtype.name.lower())
            if t.quantizable:
                data = as_16bit(materialize(name, ti.tensor), ti.dtype)
                tables.add(t, as_f32(data, ti.dtype).reshape(tuple(int(d) for d in ti.shape)))
                ti.tensor = None  # (the converter's lazy graph and data, freed)
            print(f"{WRITTEN_MARK}{name}", flush=True)
    Path(job.out).write_text(json.dumps(tables.tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main({"damage": run_damage}))
