"""Load: open a Hugging Face model folder lazily and check it before any work is done.

``open_model`` reads config.json and every safetensors header (never the tensor data) and raises a
:class:`ModelInputError` naming the file and the fix for a missing, truncated or corrupt shard, an
index naming a missing file, or a tensor the headers disagree on. ``iter_tensors`` then yields one
tensor at a time as float32, so memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lwq_gguf.errors import ModelInputError
from lwq_gguf.model.arch import Arch, arch_of

_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = {"F32", "F16", "BF16"}
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"(?:^|\.)layers\.(\d+)\..*?\bexperts\.(\d+)\.(.+)$")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: its shard, dtype, shape (HF order) and byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def layer(self) -> int | None:
        m = _LAYER_RE.search(self.name)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class HFModel:
    """A checked Hugging Face model folder (nothing but headers read)."""

    path: Path
    architecture: str
    n_layers: int
    tensors: tuple[TensorRef, ...]
    config_json: str  # the raw config.json, kept as text so the dataclass stays hashable

    @property
    def config(self) -> dict:
        return json.loads(self.config_json)

    @property
    def arch(self) -> Arch | None:
        """The architecture table's entry (None: converted with a plan from weight error)."""
        return arch_of(self.architecture)


def read_safetensors_header(file: Path) -> dict[str, TensorRef]:
    """Parse and check one shard's header; raise ModelInputError for any inconsistency."""
    fix = "re-download or re-save this shard"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelInputError(f"{file}: truncated safetensors file ({size} bytes): {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise ModelInputError(
                    f"{file}: corrupt or truncated safetensors header (claims {n} bytes, file has "
                    f"{size}): {fix}")
            raw = f.read(n)
    except OSError as e:
        raise ModelInputError(f"{file}: cannot read ({e.strerror}): check the path and "
                              "permissions") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise ModelInputError(f"{file}: corrupt safetensors header (not valid JSON): {fix}") from None
    data_start = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelInputError(f"{file}: corrupt header entry for tensor {name!r}: "
                                  f"{fix}") from None
        if dtype not in _DTYPE_SIZES:
            raise ModelInputError(f"{file}: tensor {name!r} has unknown dtype {dtype!r}: {fix}")
        numel = math.prod(shape)
        if end - begin != numel * _DTYPE_SIZES[dtype] or begin < 0:
            raise ModelInputError(
                f"{file}: tensor {name!r} byte range does not match its shape {list(shape)}: {fix}")
        if data_start + end > size:
            raise ModelInputError(
                f"{file}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has "
                f"{size} bytes: {fix}")
        out[name] = TensorRef(name, file, dtype, shape, data_start + begin, data_start + end)
    return out


def _weight_map(index: Path) -> dict[str, str]:
    """The index's weight_map ({tensor: shard file name}), checked."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v and "/" not in v
                for k, v in weight_map.items()):
            raise TypeError("weight_map is not {tensor: file name}")
        return weight_map
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelInputError(f"{index}: corrupt index (no valid weight_map): re-download it "
                              "or delete it to read the shards directly") from None


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _weight_map(index)
        names = sorted(set(weight_map.values()))
        missing = [f for f in names if not (path / f).is_file()]
        if missing:
            raise ModelInputError(f"{index}: names missing shard {missing[0]}: download that file "
                                  "into the model folder")
        return [path / f for f in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelInputError(f"{path}: no *.safetensors files: lwq-gguf reads safetensors "
                              "checkpoints (convert .bin ones with transformers' save_pretrained)")
    return files


def open_model(path: str | Path) -> HFModel:
    """Check a model folder (config, architecture, every shard header) and index its tensors."""
    path = Path(path)
    if not path.is_dir():
        raise ModelInputError(f"{path}: not a folder: pass a Hugging Face model folder "
                              "(config.json + *.safetensors)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelInputError(f"{cfg_file}: missing: the model folder needs its config.json")
    try:
        config_json = cfg_file.read_text()
        config = json.loads(config_json)
        if not isinstance(config, dict):
            raise ValueError("not an object")
    except (ValueError, OSError):
        raise ModelInputError(f"{cfg_file}: not a valid JSON object: restore the model's "
                              "config.json") from None
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if not isinstance(arch, str) or not arch:
        raise ModelInputError(f"{cfg_file}: names no architecture (\"architectures\": [...]): "
                              "restore the model's config.json")
    n_layers = config.get("num_hidden_layers")
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ModelInputError(f"{cfg_file}: num_hidden_layers missing or invalid")

    tensors: dict[str, TensorRef] = {}
    for file in _shard_files(path):
        for name, ref in read_safetensors_header(file).items():
            if name in tensors:
                raise ModelInputError(f"{file}: tensor {name!r} also in {tensors[name].file.name}: "
                                      "remove the duplicate shard")
            tensors[name] = ref
    index = path / "model.safetensors.index.json"
    if index.exists():
        for name, fname in _weight_map(index).items():
            held = tensors.get(name)
            if held is None or held.file.name != fname:
                raise ModelInputError(f"{index}: says tensor {name!r} is in {fname} but it is not: "
                                      "re-download the index and shards together")
    for ref in tensors.values():
        if ref.dtype not in _FLOAT_DTYPES:
            raise ModelInputError(f"{ref.file}: tensor {ref.name!r} is {ref.dtype}: lwq-gguf reads "
                                  "f32/f16/bf16 checkpoints (dequantize the model first)")
        if ref.layer is not None and ref.layer >= n_layers:
            raise ModelInputError(f"{ref.file}: tensor {ref.name!r} belongs to layer {ref.layer} but "
                                  f"config.json has {n_layers} layers: fix num_hidden_layers")
    for layer in range(n_layers):
        if not any(t.layer == layer for t in tensors.values()):
            raise ModelInputError(f"{path}: no tensors for layer {layer} of {n_layers}: a shard is "
                                  "missing; download every model-*.safetensors file")
    model = HFModel(path, arch, n_layers, tuple(tensors.values()), config_json)
    if model.arch is not None and model.arch.moe:
        _check_experts(model, model.arch, config, cfg_file)
    return model


def _check_experts(model: HFModel, arch: Arch, config: dict, cfg_file: Path) -> None:
    """Every MoE layer holds experts 0..n-1 of config.json's count, each with the same weights."""
    n = config.get(arch.experts)
    if not isinstance(n, int) or n < 1:
        raise ModelInputError(f"{cfg_file}: {arch.experts} missing or invalid for a "
                              f"mixture-of-experts {arch.hf}: restore the model's config.json")
    layers: dict[int, dict[int, dict[str, TensorRef]]] = {}
    for ref in model.tensors:
        m = _EXPERT_RE.search(ref.name)
        if m:
            layer, expert = int(m.group(1)), int(m.group(2))
            layers.setdefault(layer, {}).setdefault(expert, {})[m.group(3)] = ref
    for layer, experts in sorted(layers.items()):
        if max(experts) >= n:
            ref = next(iter(experts[max(experts)].values()))
            raise ModelInputError(
                f"{cfg_file}: {arch.experts} is {n} but {ref.file.name} holds expert "
                f"{max(experts)} of layer {layer} ({max(experts) + 1} or more experts): fix "
                f"{arch.experts} in config.json or use the weights it was made with")
        parts = set().union(*experts.values())
        for expert in range(n):
            missing = sorted(parts - set(experts.get(expert, {})))
            if missing:
                raise ModelInputError(
                    f"{model.path}: layer {layer} expert {expert} has no {missing[0]} (the other "
                    "experts do): a shard is incomplete; re-download the model's shards")


def read_raw(ref: TensorRef, rows: tuple[int, int] | None = None
             ) -> tuple[np.ndarray, tuple[int, ...]]:
    """One tensor's (or its rows ``[start, stop)``) bytes as stored, straight from its byte range
    into a writeable buffer, and their shape (HF)."""
    begin, end, shape = ref.begin, ref.end, tuple(ref.shape)
    if rows is not None:
        row_bytes = (end - begin) // shape[0]
        begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        shape = (rows[1] - rows[0], *shape[1:])
    buf = np.empty(end - begin, dtype=np.uint8)
    with open(ref.file, "rb") as f:
        f.seek(begin)
        got = f.readinto(buf.data)
    if got != end - begin:
        raise ModelInputError(f"{ref.file}: truncated while reading {ref.name!r}: re-download it")
    return buf, shape


def read_tensor(ref: TensorRef, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Read one tensor (or its rows ``[start, stop)``) as float32 (HF shape), straight from its
    byte range."""
    buf, shape = read_raw(ref, rows)
    if ref.dtype == "BF16":
        arr = buf.view(np.uint16).astype(np.uint32)
        del buf
        arr <<= 16  # in place: one float32-sized array, not two
        arr = arr.view(np.float32)
    else:
        arr = buf.view({"F32": np.float32, "F16": np.float16}[ref.dtype])
    return arr.astype(np.float32, copy=False).reshape(shape)


def iter_weights(model: HFModel) -> Iterator[tuple[TensorRef, np.ndarray]]:
    """Every 2-D+ float tensor, one at a time, checked for NaN/Inf."""
    for ref in model.tensors:
        if len(ref.shape) < 2:
            continue
        w = read_tensor(ref)
        if not np.isfinite(w).all():
            bad = int(np.size(w) - np.isfinite(w).sum())
            raise ModelInputError(f"{ref.file}: tensor {ref.name!r} has {bad} NaN/Inf values: "
                                  "the checkpoint is damaged; re-download or re-export it")
        yield ref, w
