"""Stage 5b - evaluate: llama-perplexity's protocol, in process, through the pinned llama.cpp.

The text is tokenized as llama-perplexity does (BOS added when the vocabulary asks for it), cut
into non-overlapping chunks of ``ctx`` tokens, the first token of each chunk replaced by BOS when
the vocabulary adds one, and only the second half of each chunk scored (positions ctx/2 .. ctx-2
predict the next token: 255 of 512). PPL = exp(mean NLL), its error exp(mean) * sd/sqrt(n-1).

With a base model (the 16-bit GGUF), base and quant run side by side, chunk by chunk, so no base
logits file is written and memory stays bounded by one chunk's logits whatever the text length:
per scored token KL(p_base || p_quant) over the whole vocabulary, its mean ± sd/sqrt(n-1), its
99th percentile (linear interpolation, as llama-perplexity), the share of tokens whose top-1
token agrees, and PPL(quant)/PPL(base).

Settings are llama-perplexity's defaults (flash attention on, weight repacking on) with one chunk
per batch: the numbers equal ``llama-perplexity -c 512 -b 512`` (tests/test_eval.py). Its default
``-b 2048`` evaluates 4 chunks per batch, which changes the CPU kernels' rounding: on the 135M demo
model that moves PPL by up to ~0.6%.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lwq_gguf.errors import LwqError
from lwq_gguf.llamacpp import LlamaCpp

_ROWS = 64  # logit rows turned into float64 log-probabilities at a time


@dataclass(frozen=True)
class EvalConfig:
    ctx: int = 512
    chunks: int | None = None  # None: every whole chunk of the text
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 0


@dataclass(frozen=True)
class EvalResult:
    ppl: float
    ppl_err: float
    chunks: int
    tokens_scored: int
    device: str
    kld_mean: float | None = None
    kld_err: float | None = None
    kld_p99: float | None = None
    same_top_pct: float | None = None
    ppl_ratio: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(lc: LlamaCpp, device: str) -> str:
    if device == "auto":
        return "cuda" if lc.has_cuda else "cpu"
    if device == "cuda" and not lc.has_cuda:
        raise LwqError(f"--device cuda: the llama.cpp build in {lc.root} has no CUDA backend: on a "
                       "machine with nvcc and an NVIDIA GPU run `LWQ_CUDA=1 make setup`, or use "
                       "--device cpu")
    if device not in ("cpu", "cuda"):
        raise LwqError(f"--device {device!r}: use cpu, cuda or auto")
    return device


def _open(lc: LlamaCpp, path: Path, cfg: EvalConfig, device: str):
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(lc.bin))
    import llama_cpp

    if not path.is_file():
        raise LwqError(f"{path}: no such file: pass a GGUF model")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LwqError(f"{path}: not a GGUF file: pass a .gguf model")
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=cfg.ctx, n_batch=cfg.ctx,
                               n_ubatch=cfg.ctx, logits_all=True, verbose=False, flash_attn=True,
                               n_gpu_layers=-1 if device == "cuda" else 0,
                               n_threads=cfg.threads or os.cpu_count() or 1)
    except (ValueError, RuntimeError) as e:
        raise LwqError(f"{path}: llama.cpp cannot load it ({e}): the file is truncated or "
                       "corrupt; re-create it") from None


def _chunk_logits(llm, chunk: list[int]) -> np.ndarray:
    """float32 logits of the scored positions of one chunk (ctx/2 .. ctx-2)."""
    llm.reset()
    llm.eval(chunk)
    first = len(chunk) // 2
    return llm.scores[first: len(chunk) - 1]


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _mean_err(values: np.ndarray) -> tuple[float, float]:
    n = values.size
    mean = float(values.mean())
    var = float((values ** 2).mean() - mean * mean)
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0


def evaluate(quant: Path, text: Path, lc: LlamaCpp, cfg: EvalConfig = EvalConfig(),
             base: Path | None = None, progress: bool = True) -> EvalResult:
    device = resolve_device(lc, cfg.device)
    try:
        raw = text.read_bytes()
    except OSError as e:
        raise LwqError(f"{text}: cannot read the text ({e.strerror}): pass --text FILE") from None
    q = _open(lc, quant, cfg, device)
    b = _open(lc, base, cfg, device) if base else None
    if b is not None:
        for what, get in (("architecture", lambda m: m.metadata.get("general.architecture")),
                          ("vocabulary", lambda m: m.n_vocab())):
            if get(q) != get(b):
                raise LwqError(f"{quant}: {what} {get(q)!r} differs from the base {base} "
                               f"({get(b)!r}): compare quants of the same model")
    tokens = q.tokenize(raw, add_bos=True, special=False)
    n_max = len(tokens) // cfg.ctx
    if n_max < 2:
        raise LwqError(f"{text}: too short: {len(tokens)} tokens make {n_max} chunk(s) of "
                       f"{cfg.ctx}; give a text of at least {2 * cfg.ctx} tokens or a smaller --ctx")
    n_chunks = min(cfg.chunks or n_max, n_max)
    add_bos, bos = q._model.add_bos_token(), q.token_bos()
    nll, nll_b, kld, same = [], [], [], []
    for i in tqdm(range(n_chunks), desc=f"eval ({device})", unit="chunk", disable=not progress,
                  leave=False):
        chunk = list(tokens[i * cfg.ctx: (i + 1) * cfg.ctx])
        if add_bos:
            chunk[0] = bos
        targets = np.asarray(chunk[cfg.ctx // 2 + 1:])
        lq = _chunk_logits(q, chunk)
        lb = _chunk_logits(b, chunk) if b is not None else None
        for r in range(0, len(targets), _ROWS):
            pq = _log_softmax(lq[r: r + _ROWS])
            t = targets[r: r + _ROWS]
            nll.append(-pq[np.arange(len(t)), t])
            if lb is not None:
                pb = _log_softmax(lb[r: r + _ROWS])
                nll_b.append(-pb[np.arange(len(t)), t])
                kld.append((np.exp(pb) * (pb - pq)).sum(axis=1))
                same.append(pb.argmax(axis=1) == pq.argmax(axis=1))
    nll_a = np.concatenate(nll)
    mean, err = _mean_err(nll_a)
    ppl = math.exp(mean)
    res = dict(ppl=ppl, ppl_err=ppl * err, chunks=n_chunks, tokens_scored=int(nll_a.size),
               device=device)
    if b is not None:
        kld_a = np.concatenate(kld)
        k_mean, k_err = _mean_err(kld_a)
        ppl_base = math.exp(float(np.concatenate(nll_b).mean()))
        res.update(kld_mean=k_mean, kld_err=k_err, kld_p99=float(np.percentile(kld_a, 99)),
                   same_top_pct=100 * float(np.concatenate(same).mean()), ppl_ratio=ppl / ppl_base)
    return EvalResult(**res)
