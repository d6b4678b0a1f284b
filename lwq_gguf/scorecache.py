"""Scores cached by what they depend on, so `plan` and `convert` at new targets reuse them.

The converter's tensor inventory (one convert_hf_to_gguf run) is cached beside them, keyed by the
model's layout (config.json, tensor names, dtypes, shapes) and the llama.cpp install.

Key = sha256 of (the model's content: config.json, tokenizer files and every safetensors file,
hashed in full; the calibration text's sha256; calibration tokens and window; the scores format
and tool version). The cache lives in ``$LWQ_SCORES_CACHE``, else ``$LWQ_CACHE/scores``, else
``~/.cache/lwq-gguf/scores``; ``--rescore`` ignores what is there (and stores the fresh result).
A file's sha256 is remembered by (path, size, mtime), so a 16 GB model is read in full once.
Entries are written atomically (temporary file + rename): a killed run never leaves a torn entry,
and an unreadable entry is treated as absent and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lwq_gguf import __version__
from lwq_gguf.errors import LwqError
from lwq_gguf.load import HFModel
from lwq_gguf.score import SCORES_VERSION, ScoreConfig, Scores

_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "vocab.json", "merges.txt")


def cache_dir() -> Path:
    env = os.environ.get("LWQ_SCORES_CACHE")
    if env:
        return Path(env)
    root = os.environ.get("LWQ_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "lwq-gguf") / "scores"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path, memo: Path | None = None) -> str:
    """sha256 of a file's bytes, remembered in ``memo`` by (resolved path, size, mtime)."""
    st = path.stat()
    ident = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    entry = memo / ident[:32] if memo else None
    if entry is not None and entry.is_file():
        known = entry.read_text().strip()
        if len(known) == 64:
            return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    digest = h.hexdigest()
    if entry is not None:
        try:
            _atomic_write(entry, digest)
        except OSError:
            pass  # a read-only cache only costs speed
    return digest


def model_sha256(model: HFModel, memo: Path | None = None) -> str:
    """The model's content: config, tokenizer and every weight file (names and bytes)."""
    names = sorted({*(n for n in _MODEL_FILES if (model.path / n).is_file()),
                    *(p.name for p in model.path.glob("*.safetensors"))})
    h = hashlib.sha256()
    for n in names:
        h.update(f"{n}:{file_sha256(model.path / n, memo)}\n".encode())
    return h.hexdigest()


def scores_key(model: HFModel, cfg: ScoreConfig, memo: Path | None = None) -> str:
    calib = file_sha256(cfg.calib_file, memo)
    parts = {"model": model_sha256(model, memo), "calib": calib, "tokens": cfg.calib_tokens,
             "seq_len": cfg.seq_len, "format": SCORES_VERSION, "lwq": __version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class ScoreCache:
    """The scores of one (model, calibration settings) in the cache folder."""

    def __init__(self, model: HFModel, cfg: ScoreConfig, root: Path | None = None) -> None:
        self.root = root or cache_dir()
        self.path = self.root / f"{scores_key(model, cfg, self.root / 'sha256')}.json"
        self.model = model

    def load(self) -> Scores | None:
        try:
            scores = Scores.from_json(self.path.read_text(), str(self.path))
            scores.check_model(self.model, str(self.path))
            return scores
        except (OSError, LwqError):
            return None

    def store(self, scores: Scores) -> None:
        try:
            _atomic_write(self.path, scores.to_json())
        except OSError:
            pass  # an unwritable cache only costs time on the next run


def cached_inventory(model: HFModel, converter: Path, compute) -> list[dict]:
    """``compute()`` (the converter's tensor rows) once per (model layout, converter install).

    The tensor list depends on config.json and the tensors' names, dtypes and shapes (all in
    ``model``, read from the headers), not on the weight bytes: no weight file is hashed here.
    """
    root = cache_dir()
    parts = {"config": model.config_json, "install": str(converter.resolve()),
             "tensors": [[t.name, t.dtype, list(t.shape)] for t in model.tensors],
             "converter": file_sha256(converter, root / "sha256"), "lwq": __version__}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    path = root / "inventory" / f"{key}.json"
    try:
        rows = json.loads(path.read_text())
        if isinstance(rows, list) and rows and all(
                isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("type"), str)
                and isinstance(r.get("shape"), list) and all(isinstance(d, int) for d in r["shape"])
                for r in rows):
            return rows
    except (OSError, ValueError):
        pass
    rows = compute()
    try:
        _atomic_write(path, json.dumps(rows))
    except OSError:
        pass
    return rows
