"""Scores cached by everything they depend on, so `plan` and `convert` at new targets reuse them.

Key = sha256 of (the model's content: config.json, tokenizer files and every safetensors file,
hashed in full; the calibration text's sha256; calibration tokens and window; the scores format;
and the digest of the code that measures: the ``score``, ``model`` and ``quant`` sub-packages,
the Q4_K encoder's C source included). Change any of them and the old entry is not reused.

The cache lives in :func:`lwq_gguf.files.scores_cache_dir` (``$LWQ_SCORES_CACHE``, else the
cache root's ``scores/``);
``--rescore`` ignores what is there (and stores the fresh result). A file's sha256 is remembered
by (path, size, mtime), so a 16 GB model is read in full once. Entries are written atomically: a
killed run never leaves a torn entry, and an unreadable or malformed entry is treated as absent
and replaced.
"""

from __future__ import annotations

import hashlib
import json
from lwq_gguf.errors import LwqError
from lwq_gguf.files import (code_digest, remembered_sha256, scores_cache_dir, sha256_file,
                            sha256_memo, write_cache_text)
from lwq_gguf.model.load import HFModel
from lwq_gguf.score.scores import SCORES_VERSION, ScoreConfig, Scores

_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "vocab.json", "merges.txt")
CODE = ("score", "model", "quant")  # the code whose output the cache holds


def _model_files(model: HFModel) -> list[str]:
    return sorted({*(n for n in _MODEL_FILES if (model.path / n).is_file()),
                   *(t.file.name for t in model.tensors)})


def remembered(model: HFModel) -> bool:
    """Whether every file's digest is remembered (so :func:`model_sha256` reads no weights)."""
    memo = sha256_memo()
    return all(remembered_sha256(model.path / n, memo) is not None for n in _model_files(model))


def model_sha256(model: HFModel) -> str:
    """The model's content: config, tokenizer and every weight file (names and bytes)."""
    names = _model_files(model)
    h = hashlib.sha256()
    for n in names:
        try:
            h.update(f"{n}:{sha256_file(model.path / n, sha256_memo())}\n".encode())
        except OSError as e:
            raise LwqError(f"{model.path / n}: cannot read ({e.strerror}): check the model "
                           "folder's permissions") from None
    return h.hexdigest()


def scores_key(model_digest: str, cfg: ScoreConfig, code: str) -> str:
    try:
        calib = sha256_file(cfg.calib_file, sha256_memo())
    except OSError as e:
        raise LwqError(f"{cfg.calib_file}: cannot read the calibration text ({e.strerror}): pass "
                       "--calib FILE") from None
    parts = {"model": model_digest, "calib": calib, "tokens": cfg.calib_tokens,
             "fisher_tokens": cfg.fisher_tokens, "precision": cfg.precision,
             "seq_len": cfg.seq_len, "format": SCORES_VERSION, "code": code}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class ScoreCache:
    """The scores of one (model, calibration settings, scoring code) in the cache folder.

    ``code`` defaults to the digest of the scoring code itself (:data:`CODE`)."""

    def __init__(self, model: HFModel, model_digest: str, cfg: ScoreConfig,
                 code: str | None = None) -> None:
        self.model, self.model_digest = model, model_digest
        key = scores_key(model_digest, cfg, code if code is not None else code_digest(*CODE))
        self.path = scores_cache_dir() / f"{key}.json"

    def load(self) -> Scores | None:
        try:
            scores = Scores.from_json(self.path.read_text(), str(self.path))
            scores.check_model(self.model, self.model_digest, str(self.path))
            return scores
        except (OSError, UnicodeDecodeError, LwqError):
            return None

    def store(self, scores: Scores) -> None:
        write_cache_text(self.path, scores.to_json())  # unwritable: only costs time next run
