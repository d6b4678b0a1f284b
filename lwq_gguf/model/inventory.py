"""The GGUF a model becomes, from llama.cpp's own converter (the pinned convert_hf_to_gguf.py):
its tensor list (:class:`GGUFTensor`, :func:`inventory`, :func:`model_tensors`) and the converter
child every stage runs it in.

The parent describes the work as a :class:`ConverterJob` (data, written as JSON) and runs
``python -m MODULE JOB.json``, MODULE being the stage that does the work inside the child
(:func:`child_main` with its handlers); the converter's module state and memory never leak into
lwq-gguf. Jobs:

* ``inventory`` (this module) - the exact GGUF tensor list (name, ggml shape, type) the converter
  would write, computed lazily without writing anything (cached: :func:`inventory`);
* ``write`` (this module) - the 16-bit GGUF, with extra metadata key/values (``kv``: lwq.*);
* ``stub`` (this module) - the 16-bit GGUF's header, metadata and tensor infos, its data a sparse
  hole of the right length: what ``llama-quantize --dry-run`` reads (:mod:`lwq_gguf.plan.mixes`);
* ``onepass`` (:mod:`lwq_gguf.write.onepass`) - the planned GGUF itself, each tensor quantized as
  the writer reaches it;
* ``damage`` (:mod:`lwq_gguf.score.weights`) - the weight-error damage tables of the tensors as
  the converter makes them, for architectures lwq-gguf runs no forward pass of.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lwq_gguf.errors import LwqError, ToolError
from lwq_gguf.files import (code_digest, scores_cache_dir, sha256_file, sha256_memo,
                            write_cache_text)
from lwq_gguf.llamacpp import LlamaCpp, find_llama_cpp, run_tool
from lwq_gguf.model.load import HFModel
from lwq_gguf.process import run_process

ERROR_MARK = "lwq-error: "  # a user error found in the child, passed on as one line
WRITTEN_MARK = "lwq-written "  # printed by the child as each tensor is written (progress)

_BLK = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight)?$")
# tensor_allows_quantization at the pin (src/llama-quant.cpp): name parts never quantized
_NEVER = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "position_embd", "token_types", "ssm_conv1d", "shortconv.conv.weight",
    "indexer.k_proj.weight", "indexer.q_proj.weight", "attn_rel_b.weight", "time_mix_first.weight",
    "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight",
    "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the GGUF as llama.cpp's converter writes it (ggml shape: ne0 first)."""

    name: str
    shape: tuple[int, ...]
    src_type: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def layer(self) -> int | None:
        m = _BLK.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def kind(self) -> str:
        m = _BLK.match(self.name)
        return m.group(2) if m else self.name.removesuffix(".weight")

    @property
    def n_dims(self) -> int:
        """ggml_n_dims: trailing dimensions of 1 do not count (a [256, 1] gate is 1-D)."""
        n = len(self.shape)
        while n > 1 and self.shape[n - 1] == 1:
            n -= 1
        return n

    @property
    def experts(self) -> int:
        """The number of experts merged in a 3-D ``ffn_*_exps`` tensor (1 for any other)."""
        return self.shape[2] if self.n_dims == 3 else 1

    @property
    def quantizable(self) -> bool:
        """The same rule as llama-quantize (tensor_allows_quantization at the pin)."""
        return (self.n_dims >= 2 and self.name.endswith("weight")
                and not any(s in self.name for s in _NEVER))


@dataclass(frozen=True, kw_only=True)
class ConverterJob:
    mode: str  # inventory | write | stub (this module) | onepass | damage (their stages' handlers)
    src: str  # the pinned llama.cpp source folder (convert_hf_to_gguf.py, conversion/)
    model: str
    out: str
    outtype: str = "auto"  # auto | f16 | bf16 | f32, as convert_hf_to_gguf.py --outtype
    kv: dict = field(default_factory=dict)  # extra metadata: str, float or int values
    task: dict = field(default_factory=dict)  # the handler's settings, as data

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ConverterJob:
        return cls(**json.loads(text))


Handler = Callable[[object, ConverterJob], int]  # (the converter's model instance, job) -> exit


def model_instance(job: ConverterJob):
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


def add_kv(w, kv: dict) -> None:
    for key, value in kv.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, int(value))


def child_main(handlers: dict[str, Handler]) -> int:
    """The child's entry (``python -m MODULE JOB.json``): the converter's model instance made
    under torch's inference mode, handed to the job mode's handler. A user error is printed as one
    marked line (:func:`run_job` raises it in the parent)."""
    return run_process(lambda: _child(handlers))


def _child(handlers: dict[str, Handler]) -> int:
    import torch

    job = ConverterJob.from_json(Path(sys.argv[1]).read_text())
    try:
        with torch.inference_mode():
            return handlers[job.mode](model_instance(job), job)
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


def run_job(job: ConverterJob, module: str, on_line=None) -> None:
    """Run ``job`` in a child process, ``python -m module`` (whose :func:`child_main` has the
    job's mode). A user error the child finds (a NaN weight) is raised here as that one line;
    the converter's own failure as a ToolError with its last lines."""
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
            run_tool([sys.executable, "-m", module, str(spec)],
                     what=f"convert_hf_to_gguf on {job.model}", on_line=seen)
        except ToolError:
            if errors:
                raise LwqError(errors[-1]) from None
            raise


def write_16bit(lc: LlamaCpp, model_dir: Path, out: Path, outtype: str = "auto",
                kv: dict | None = None, on_line=None) -> None:
    """The converter's own GGUF of ``model_dir`` (16-bit, or f32 with outtype f32) at ``out``,
    with the metadata ``kv`` added."""
    run_job(ConverterJob(mode="write", src=str(lc.src), model=str(model_dir), out=str(out),
                         outtype=outtype, kv=kv or {}), __name__, on_line)


def _write(inst, job: ConverterJob) -> int:
    add_kv(inst.gguf_writer, job.kv)
    inst.write()
    return 0


def _inventory(inst, job: ConverterJob) -> int:
    inst.prepare_tensors()
    rows = [{"name": name, "shape": [int(d) for d in reversed(ti.shape)],
             "type": ti.dtype.name.lower()}
            for shard in inst.gguf_writer.tensors for name, ti in shard.items()]
    # (the header needs the vocabulary read: half of the child's time, and only a plan needs it)
    header = _header_bytes(inst, job) if job.task.get("header", True) else None
    Path(job.out).write_text(json.dumps({"tensors": rows, "header_bytes": header}))
    return 0


def _header_bytes(inst, job: ConverterJob) -> int:
    """Bytes of the 16-bit file's header, metadata and tensor infos (what precedes the data):
    written to a scratch file without the tensors."""
    scratch = Path(job.out).with_name("header.gguf")
    _write_header(inst, scratch)
    return scratch.stat().st_size


def _write_header(inst, path: Path) -> int:
    """The header, metadata and tensor infos of the converter's file at ``path``; returns the
    bytes its tensor data would take (each tensor padded to the alignment)."""
    inst.prepare_metadata(vocab_only=False)
    w = inst.gguf_writer
    align = w.data_alignment
    data = sum(-(-ti.nbytes // align) * align for shard in w.tensors for ti in shard.values())
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return data


def _stub(inst, job: ConverterJob) -> int:
    """The 16-bit GGUF without its data: header, metadata and tensor infos, then a sparse hole
    as long as the data (no weight is read; the hole takes no disk)."""
    inst.prepare_tensors()
    out = Path(job.out)
    data = _write_header(inst, out)
    align = inst.gguf_writer.data_alignment
    os.truncate(out, -(-out.stat().st_size // align) * align + data)
    return 0


@dataclass(frozen=True)
class Inventory:
    """What the converter would write for a model: its tensors, and the bytes before their data
    (header, metadata - the vocabulary among it - and tensor infos) in the 16-bit file."""

    tensors: tuple[GGUFTensor, ...]
    header_bytes: int


def _inventory_rows(path: Path, header: bool = True) -> dict | None:
    """The inventory file's document if it is well formed (and holds the header's bytes, when
    ``header``), else None."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not (isinstance(doc.get("header_bytes"), int) or (
            not header and doc.get("header_bytes") is None)):
        return None
    rows = doc.get("tensors")
    ok = isinstance(rows, list) and rows and all(
        isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("type"), str)
        and isinstance(r.get("shape"), list) and all(isinstance(d, int) for d in r["shape"])
        for r in rows)
    return doc if ok else None


def model_tensors(model: HFModel, header: bool = False) -> tuple[GGUFTensor, ...]:
    """The GGUF tensor list of ``model``, from the pinned converter itself (:func:`inventory`;
    ``header``: measure the header's bytes in the same run, for a plan made next)."""
    return _listing(model, header)[0]


def inventory(model: HFModel) -> Inventory:
    """The GGUF tensor list of ``model`` and its 16-bit file's header size, from the pinned
    converter itself.

    Cached in ``scores_cache_dir()/inventory`` by what it
    depends on: config.json and the tensors' names, dtypes and shapes (read from the headers; no
    weight file is hashed), the converter install and its source, and this module's code. A
    listing made for scoring alone holds no header size; the first plan measures it.
    """
    tensors, header = _listing(model, True)
    assert header is not None
    return Inventory(tensors, header)


def _listing(model: HFModel, header: bool) -> tuple[tuple[GGUFTensor, ...], int | None]:
    lc = find_llama_cpp()
    converter = lc.src / "convert_hf_to_gguf.py"
    root = scores_cache_dir()
    parts = {"config": model.config_json, "install": str(converter.resolve()),
             "tensors": [[t.name, t.dtype, list(t.shape)] for t in model.tensors],
             "converter": sha256_file(converter, sha256_memo()),
             "code": code_digest("model/inventory.py")}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    path = root / "inventory" / f"{key}.json"
    doc = _inventory_rows(path, header)
    if doc is None:
        with tempfile.TemporaryDirectory(prefix="lwq-inv-") as tmp:
            out = Path(tmp) / "inventory.json"
            run_job(ConverterJob(mode="inventory", src=str(lc.src), model=str(model.path),
                                 out=str(out), task={"header": header}), __name__)
            doc = _inventory_rows(out, header)
        if doc is None:
            raise ToolError(f"convert_hf_to_gguf on {model.path} listed no tensors: check the "
                            "model folder")
        write_cache_text(path, json.dumps(doc))
    return (tuple(GGUFTensor(r["name"], tuple(r["shape"]), r["type"]) for r in doc["tensors"]),
            doc["header_bytes"])


if __name__ == "__main__":
    raise SystemExit(child_main({"inventory": _inventory, "write": _write, "stub": _stub}))
