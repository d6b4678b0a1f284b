"""llama.cpp's own HF -> GGUF converter (the pinned convert_hf_to_gguf.py), run in a child process.

The parent describes the work as a :class:`ConverterJob` (data, written as JSON) and runs
``python -m lwq_gguf.write.converter JOB.json``; the converter's module state and memory never
leak into lwq-gguf. Jobs:

* ``inventory`` - the exact GGUF tensor list (name, ggml shape, type) the converter would write,
  computed lazily without writing anything (cached: :func:`model_tensors`);
* ``write`` - the 16-bit GGUF, with extra metadata key/values (``kv``: lwq.*);
* ``write`` with ``quantize`` set - single pass: the planned GGUF itself, each tensor quantized
  as the writer reaches it (:mod:`lwq_gguf.write.onepass`);
* ``damage`` - the weight-error damage tables (:mod:`lwq_gguf.score.weights`) of the tensors as
  the converter makes them, for architectures lwq-gguf runs no forward pass of (JSON at ``out``).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lwq_gguf.errors import LwqError, ToolError
from lwq_gguf.files import (code_digest, scores_cache_dir, sha256_file, sha256_memo,
                            write_cache_text)
from lwq_gguf.llamacpp import LlamaCpp, find_llama_cpp, run_tool
from lwq_gguf.model.load import HFModel
from lwq_gguf.quant.tensors import GGUFTensor, as_16bit, as_f32, materialize
from lwq_gguf.score.weights import WeightDamageJob
from lwq_gguf.write.onepass import QuantizeSettings

ERROR_MARK = "lwq-error: "  # a user error found in the child, passed on as one line
WRITTEN_MARK = "lwq-written "  # printed by the child as each tensor is written (progress)


@dataclass(frozen=True, kw_only=True)
class ConverterJob:
    mode: str  # inventory | write | damage
    src: str  # the pinned llama.cpp source folder (convert_hf_to_gguf.py, conversion/)
    model: str
    out: str
    outtype: str = "auto"  # auto | f16 | bf16 | f32, as convert_hf_to_gguf.py --outtype
    kv: dict = field(default_factory=dict)  # extra metadata: str, float or int values
    quantize: QuantizeSettings | None = None  # single pass: quantize as the writer goes
    damage: WeightDamageJob | None = None  # mode damage: the tables to make

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ConverterJob:
        d = json.loads(text)
        q, dm = d.pop("quantize"), d.pop("damage")
        return cls(**d, quantize=QuantizeSettings(**q) if q else None,
                   damage=WeightDamageJob(ladder=tuple(dm["ladder"]), keys=tuple(dm["keys"]),
                                          imatrix_files=dm["imatrix_files"]) if dm else None)


def _model_instance(job: ConverterJob):
    sys.path.insert(0, job.src)
    import logging

    import gguf
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ftypes = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "auto": gguf.LlamaFileType.GUESSED}
    model_dir = Path(job.model)
    hparams = ModelBase.load_hparams(model_dir, False)
    arch = get_model_architecture(hparams, ModelType.TEXT)
    try:
        cls = get_model_class(arch, mmproj=False)
    except NotImplementedError:
        from lwq_gguf.model.arch import SCORED

        raise LwqError(f"{model_dir / 'config.json'}: architecture {arch!r} is not supported by "
                       "llama.cpp's converter (convert_hf_to_gguf.py), so not by lwq-gguf either: "
                       f"lwq-gguf scores {', '.join(SCORED)} and converts the converter's other "
                       "architectures with a plan from weight error") from None
    return cls(model_dir, ftypes[job.outtype], Path(job.out))


def _add_kv(w, kv: dict) -> None:
    for key, value in kv.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, int(value))


def _run(job: ConverterJob) -> int:
    try:
        return _convert(job)
    except LwqError as e:
        print(f"{ERROR_MARK}{e}", flush=True)
        return 3
    except ValueError as e:  # the converter's word for weights its architecture does not have
        m = re.match(r"Can not map tensor '(.+)'", str(e))
        if not m:
            raise
        arch = json.loads((Path(job.model) / "config.json").read_text())["architectures"][0]
        print(f"{ERROR_MARK}{job.model}: {m.group(1)} is not a tensor of {arch} as llama.cpp's "
              "converter knows it: config.json names the wrong architecture, or the weights are "
              "of another model", flush=True)
        return 3


def _convert(job: ConverterJob) -> int:
    import torch

    from lwq_gguf.write.onepass import requantize_writer

    with torch.inference_mode():
        inst = _model_instance(job)
        if job.mode == "inventory":
            inst.prepare_tensors()
            rows = [{"name": name, "shape": [int(d) for d in reversed(ti.shape)],
                     "type": ti.dtype.name.lower()}
                    for shard in inst.gguf_writer.tensors for name, ti in shard.items()]
            Path(job.out).write_text(json.dumps({"tensors": rows,
                                                 "header_bytes": _header_bytes(inst, job)}))
            return 0
        if job.mode == "damage":
            return _damage(inst, job)
        w = inst.gguf_writer
        _add_kv(w, job.kv)
        if job.quantize is None:
            inst.write()
            return 0
        inst.prepare_tensors()
        inst.prepare_metadata(vocab_only=False)
        pool, ahead = requantize_writer(w, job.quantize,
                                        lambda name: print(f"{WRITTEN_MARK}{name}", flush=True))
        with pool, ahead:
            w.write_header_to_file(path=Path(job.out))
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=False)
            w.close()
    return 0


def _header_bytes(inst, job: ConverterJob) -> int:
    """Bytes of the 16-bit file's header, metadata and tensor infos (what precedes the data):
    written to a scratch file without the tensors."""
    inst.prepare_metadata(vocab_only=False)
    w = inst.gguf_writer
    scratch = Path(job.out).with_name("header.gguf")
    w.write_header_to_file(path=scratch)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return scratch.stat().st_size


def _damage(inst, job: ConverterJob) -> int:
    from lwq_gguf.score.weights import WeightDamage

    inst.prepare_tensors()
    tables = WeightDamage(job.damage, find_llama_cpp())
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


def run_job(job: ConverterJob, on_line=None) -> None:
    """Run ``job`` in a child process. A user error the child finds (a NaN weight) is raised here
    as that one line; the converter's own failure as a ToolError with its last lines."""
    errors: list[str] = []

    def seen(line: str) -> None:
        if line.startswith(ERROR_MARK):
            errors.append(line[len(ERROR_MARK):])
        if on_line:
            on_line(line)

    with tempfile.TemporaryDirectory(prefix="lwq-conv-") as tmp:
        spec = Path(tmp) / "job.json"
        spec.write_text(job.to_json())
        try:
            run_tool([sys.executable, "-m", "lwq_gguf.write.converter", str(spec)],
                     what=f"convert_hf_to_gguf on {job.model}", on_line=seen)
        except ToolError:
            if errors:
                raise LwqError(errors[-1]) from None
            raise


def write_16bit(lc: LlamaCpp, model_dir: Path, out: Path, outtype: str = "auto") -> None:
    """The converter's own GGUF of ``model_dir`` (16-bit, or f32 with outtype f32) at ``out``."""
    run_job(ConverterJob(mode="write", src=str(lc.src), model=str(model_dir), out=str(out),
                         outtype=outtype))


@dataclass(frozen=True)
class Inventory:
    """What the converter would write for a model: its tensors, and the bytes before their data
    (header, metadata - the vocabulary among it - and tensor infos) in the 16-bit file."""

    tensors: tuple[GGUFTensor, ...]
    header_bytes: int


def _inventory_rows(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("header_bytes"), int):
        return None
    rows = doc.get("tensors")
    ok = isinstance(rows, list) and rows and all(
        isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("type"), str)
        and isinstance(r.get("shape"), list) and all(isinstance(d, int) for d in r["shape"])
        for r in rows)
    return doc if ok else None


def model_tensors(model: HFModel) -> tuple[GGUFTensor, ...]:
    """The GGUF tensor list of ``model``, from the pinned converter itself (:func:`inventory`)."""
    return inventory(model).tensors


def inventory(model: HFModel) -> Inventory:
    """The GGUF tensor list of ``model`` and its 16-bit file's header size, from the pinned
    converter itself.

    Cached in ``scores_cache_dir()/inventory`` by what it
    depends on: config.json and the tensors' names, dtypes and shapes (read from the headers; no
    weight file is hashed), the converter install and its source, and this module's code.
    """
    lc = find_llama_cpp()
    converter = lc.src / "convert_hf_to_gguf.py"
    root = scores_cache_dir()
    parts = {"config": model.config_json, "install": str(converter.resolve()),
             "tensors": [[t.name, t.dtype, list(t.shape)] for t in model.tensors],
             "converter": sha256_file(converter, sha256_memo()),
             "code": code_digest("write/converter.py", "write/onepass.py")}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    path = root / "inventory" / f"{key}.json"
    doc = _inventory_rows(path)
    if doc is None:
        with tempfile.TemporaryDirectory(prefix="lwq-inv-") as tmp:
            out = Path(tmp) / "inventory.json"
            run_job(ConverterJob(mode="inventory", src=str(lc.src), model=str(model.path),
                                 out=str(out)))
            doc = _inventory_rows(out)
        if doc is None:
            raise ToolError(f"convert_hf_to_gguf on {model.path} listed no tensors: check the "
                            "model folder")
        write_cache_text(path, json.dumps(doc))
    return Inventory(tuple(GGUFTensor(r["name"], tuple(r["shape"]), r["type"])
                           for r in doc["tensors"]), doc["header_bytes"])


if __name__ == "__main__":
    raise SystemExit(_run(ConverterJob.from_json(Path(sys.argv[1]).read_text())))
