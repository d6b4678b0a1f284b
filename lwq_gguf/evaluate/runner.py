"""The pinned llama.cpp through llama-cpp-python's public API only: load a GGUF (after a probe in
a child process), its vocabulary, and the logits of one chunk's scored positions.

Everything here uses the ``Llama`` class's public members (``ctx``, ``model``, ``tokenize``,
``token_bos``, ``n_vocab``, ``metadata``) and the C functions ``llama_cpp`` exports
(``llama_batch_init``, ``llama_decode``, ``llama_get_logits``, ``llama_memory_seq_rm``,
``llama_vocab_get_add_bos``): no private attribute of the bindings is touched. That it still
reproduces ``llama-perplexity`` is pinned by tests/evaluate/test_eval.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lwq_gguf.errors import LwqError
from lwq_gguf.llamacpp import LlamaCpp

_PROBE = ("import sys, llama_cpp\n"
          "llama_cpp.Llama(model_path=sys.argv[1], n_ctx=32, n_batch=32, verbose=True, "
          "n_gpu_layers=0)")


def bindings(lc: LlamaCpp):
    """The ``llama_cpp`` module, bound to the pinned build's libraries."""
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(lc.bin))
    import llama_cpp

    return llama_cpp


def probe(lc: LlamaCpp, path: Path) -> None:
    """Load ``path`` once in a child process (mmap, CPU): a malformed GGUF that makes llama.cpp
    abort (a GGML_ASSERT, e.g. a vocabulary with duplicate tokens) ends in an error line here
    instead of killing this process."""
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lc.bin))
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True,
                           text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        raise LwqError(f"{path}: llama.cpp did not finish loading it in 15 min: the file is "
                       "corrupt; re-create it") from None
    if p.returncode != 0:
        err = [ln.strip() for ln in p.stderr.splitlines()]
        asserts = [ln.rsplit("/", 1)[-1] for ln in err if "GGML_ASSERT" in ln]
        fails = [ln for ln in err if ("fail" in ln.lower() or "error" in ln.lower())
                 and ":" in ln.split(" ", 1)[0] and not ln.startswith(("ValueError", "File"))]
        why = (asserts or fails or [f"exit status {p.returncode}"])[0][:200]
        raise LwqError(f"{path}: llama.cpp cannot load it ({why}): the file is truncated or "
                       "corrupt; re-create it")


def load_gguf(lc: LlamaCpp, path: Path, ctx: int, device: str, threads: int):
    """A ``llama_cpp.Llama`` for evaluation: ``ctx`` tokens per batch, flash attention on, all
    layers offloaded on cuda."""
    llama_cpp = bindings(lc)
    if not path.is_file():
        raise LwqError(f"{path}: no such file: pass a GGUF model")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LwqError(f"{path}: not a GGUF file: pass a .gguf model")
    probe(lc, path)
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx,
                               verbose=False, flash_attn=True,
                               n_gpu_layers=-1 if device == "cuda" else 0,
                               n_threads=threads or os.cpu_count() or 1)
    except (ValueError, RuntimeError) as e:
        raise LwqError(f"{path}: llama.cpp cannot load it ({e}): the file is truncated or "
                       "corrupt; re-create it") from None


@contextmanager
def _quiet():
    """Send this process's stdout/stderr file descriptors to /dev/null (llama.cpp's C logging)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def vocab_tokens(lc: LlamaCpp, gguf: Path, raw: bytes) -> list[int]:
    """``raw`` tokenized with ``gguf``'s vocabulary as llama-perplexity does (BOS when asked)."""
    llama_cpp = bindings(lc)
    with _quiet():  # llama.cpp warns about n_ctx on vocab-only loads
        vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    return vocab.tokenize(raw, add_bos=True, special=False)


def adds_bos(lc: LlamaCpp, llm) -> bool:
    llama_cpp = bindings(lc)
    return bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))


class ChunkLogits:
    """One llama_batch of ``ctx`` tokens, reused for every chunk and model (freed on close)."""

    def __init__(self, lc: LlamaCpp, ctx: int) -> None:
        self.api = bindings(lc)
        self.batch = self.api.llama_batch_init(ctx, 0, 1)

    def __enter__(self) -> ChunkLogits:
        return self

    def __exit__(self, *exc) -> None:
        self.api.llama_batch_free(self.batch)

    def __call__(self, llm, chunk: list[int]) -> np.ndarray:
        """float32 logits of the scored positions of one chunk (ctx/2 .. ctx-2), one decode
        call with outputs requested for those positions only (as llama-perplexity does)."""
        api, b = self.api, self.batch
        first, n = len(chunk) // 2, len(chunk)
        api.llama_memory_seq_rm(api.llama_get_memory(llm.ctx), 0, 0, -1)
        b.n_tokens = n
        for i, tok in enumerate(chunk):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = first <= i < n - 1
        rc = api.llama_decode(llm.ctx, b)
        if rc != 0:
            raise LwqError(f"llama.cpp could not evaluate a chunk (llama_decode returned {rc}): "
                           "try --device cpu or a smaller --ctx")
        return np.ctypeslib.as_array(api.llama_get_logits(llm.ctx),
                                     shape=(n - 1 - first, llm.n_vocab()))
