"""Evaluate: llama-perplexity's protocol, in process, through the pinned llama.cpp.

The text is tokenized as llama-perplexity does (BOS added when the vocabulary asks for it), cut
into non-overlapping chunks of ``ctx`` tokens, the first token of each chunk replaced by BOS when
the vocabulary adds one, and only the second half of each chunk scored (positions ctx/2 .. ctx-2
predict the next token: 255 of 512). PPL = exp(mean NLL), its error exp(mean) * sd/sqrt(n-1).

With a base model (the 16-bit GGUF), base and quant run side by side, chunk by chunk, so no base
logits file is written and memory stays bounded by one chunk's logits whatever the text length:
per scored token KL(p_base || p_quant) over the whole vocabulary, its mean ± sd/sqrt(n-1), its
99th percentile (linear interpolation, as llama-perplexity), the share of tokens whose top-1
token agrees, and PPL(quant)/PPL(base). Log-probabilities are float32 (torch, threaded), the
per-token values are accumulated in float64. Logits are requested for the scored positions only.

``evaluate_many`` runs several files of one model against one base: the base runs once per chunk
and the files run beside it, as many at a time as fit in half the free memory (``compare``).

A llama.cpp built with CUDA and PyTorch's CUDA libraries cannot share a process: on an H100 with
torch 2.11+cu130 and the pinned llama.cpp built against CUDA 13.0, loading a model after
``import torch`` segfaults (with and without offloading) and importing torch after llama.cpp
aborts (bench/results/gpu.json). So with a CUDA build every llama.cpp call of this module runs in
a child process (``python -m lwq_gguf.evaluate.child``) that never imports torch; numpy does its
log-softmax. ``LWQ_EVAL_ISOLATE=1`` does the same with a CPU build (tests).

Settings are llama-perplexity's defaults (flash attention on, weight repacking on) with one chunk
per batch: the numbers equal ``llama-perplexity -c 512 -b 512`` (tests/evaluate/test_eval.py). Its default
``-b 2048`` evaluates 4 chunks per batch, which changes the CPU kernels' rounding: on the 135M demo
model that moves PPL by up to ~0.6%.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lwq_gguf.errors import LwqError
from lwq_gguf.evaluate.child import in_child, isolated, run_child, serve
from lwq_gguf.evaluate.runner import ChunkLogits, adds_bos, load_gguf, vocab_tokens
from lwq_gguf.llamacpp import LlamaCpp
from lwq_gguf.process import run_process

MODULE = "lwq_gguf.evaluate.perplexity"  # run as the torch-free child (lwq_gguf.evaluate.child)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    ctx: int = 512
    chunks: int | None = None  # None: every whole chunk of the text
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 0
    memory_budget: int | None = None  # bytes of models open beside the base (None: half the free)


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


def llama_device(lc: LlamaCpp, device: str) -> str:
    if device == "auto":
        return "cuda" if lc.has_cuda else "cpu"
    if device == "cuda" and not lc.has_cuda:
        raise LwqError(f"--device cuda: the llama.cpp build in {lc.root} has no CUDA backend: on a "
                       "machine with nvcc and an NVIDIA GPU run `LWQ_CUDA=1 make setup`, or use "
                       "--device cpu")
    if device not in ("cpu", "cuda"):
        raise LwqError(f"--device {device!r}: use cpu, cuda or auto")
    return device


class _TorchOps:
    """Per-chunk arithmetic in torch (vectorised and threaded); sums are taken in float64 later."""

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def ints(self, x):
        return self.torch.tensor(x)

    def log_softmax(self, rows: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).log_softmax(-1)

    @staticmethod
    def exp(a):
        return a.exp()

    @staticmethod
    def numpy(a) -> np.ndarray:
        return a.numpy()

    @staticmethod
    def f64(a) -> np.ndarray:
        return a.double().numpy()


class _NumpyOps:
    """The same in numpy, for the torch-free child process."""

    ints = staticmethod(np.asarray)
    numpy = staticmethod(np.asarray)
    exp = staticmethod(np.exp)

    @staticmethod
    def f64(a) -> np.ndarray:
        return np.asarray(a, dtype=np.float64)

    @staticmethod
    def log_softmax(rows: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(rows, dtype=np.float32)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _mean_err(values: np.ndarray) -> tuple[float, float]:
    n = values.size
    mean = float(values.mean())
    var = float((values ** 2).mean() - mean * mean)
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0


def _memory_budget(device: str) -> int:
    """Bytes of models that may be open at once besides the base: half the available memory."""
    if device == "cuda":
        try:
            import torch

            return int(torch.cuda.mem_get_info()[0] * 0.8)
        except Exception:  # noqa: BLE001 - no torch CUDA: one quant at a time
            return 0
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 0
    return avail // 2


def _groups(quants: list[Path], base: Path | None, budget: int) -> list[list[int]]:
    """Indices of the quants, grouped so each group plus the base fits in ``budget`` bytes."""
    room = budget - (base.stat().st_size if base else 0)
    groups: list[list[int]] = [[]]
    used = 0
    for i, q in enumerate(quants):
        size = q.stat().st_size if q.is_file() and q != base else 0
        if groups[-1] and used + size > room:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


def _read_text(text: Path) -> bytes:
    try:
        return text.read_bytes()
    except OSError as e:
        raise LwqError(f"{text}: cannot read the text ({e.strerror}): pass --text FILE") from None


def _same_model(quant: Path, q, base: Path, b) -> None:
    for what, get in (("architecture", lambda m: m.metadata.get("general.architecture")),
                      ("vocabulary", lambda m: m.n_vocab())):
        if get(q) != get(b):
            raise LwqError(f"{quant}: {what} {get(q)!r} differs from the base {base} "
                           f"({get(b)!r}): compare quants of the same model")


def _whole_chunks(tokens, text: Path, ctx: int) -> int:
    n = len(tokens) // ctx
    if n < 2:
        raise LwqError(f"{text}: too short: {len(tokens)} tokens make {n} chunk(s) of {ctx}; give "
                       f"a text of at least {2 * ctx} tokens or a smaller --ctx")
    return n


def check_text(gguf: Path, text: Path, lc: LlamaCpp, ctx: int) -> int:
    """The number of whole chunks ``text`` makes with ``gguf``'s vocabulary (at least 2)."""
    if isolated(lc):
        return run_child(lc, MODULE, "check_text", {"gguf": str(gguf), "text": str(text),
                                                    "ctx": ctx})
    return _whole_chunks(vocab_tokens(lc, gguf, _read_text(text)), text, ctx)


class _Tally:
    """Per-token NLL (and, against a base, KLD and top-1 agreement) of one quant."""

    def __init__(self) -> None:
        self.nll: list[np.ndarray] = []
        self.nll_base: list[np.ndarray] = []
        self.kld: list[np.ndarray] = []
        self.same: list[np.ndarray] = []

    def result(self, n_chunks: int, device: str) -> EvalResult:
        nll = np.concatenate(self.nll)
        mean, err = _mean_err(nll)
        ppl = math.exp(mean)
        res: dict[str, Any] = dict(ppl=ppl, ppl_err=ppl * err, chunks=n_chunks,
                                   tokens_scored=int(nll.size), device=device)
        if self.kld:
            kld = np.concatenate(self.kld)
            k_mean, k_err = _mean_err(kld)
            ppl_base = math.exp(float(np.concatenate(self.nll_base).mean()))
            res.update(kld_mean=k_mean, kld_err=k_err, kld_p99=float(np.percentile(kld, 99)),
                       same_top_pct=100 * float(np.concatenate(self.same).mean()),
                       ppl_ratio=ppl / ppl_base)
        return EvalResult(**res)


def evaluate_many(quants: list[Path], text: Path, lc: LlamaCpp, cfg: EvalConfig = EvalConfig(),
                  base: Path | None = None, progress: bool = True) -> list[EvalResult]:
    """Evaluate several files of one model on the same chunks; the base runs once per chunk.

    Quants are opened in groups that fit in ``cfg.memory_budget`` bytes (default: half the free
    memory; each group re-runs the base).
    """
    device = llama_device(lc, cfg.device)
    if cfg.memory_budget is None:
        cfg = replace(cfg, memory_budget=_memory_budget(device))
    if isolated(lc) and quants:
        _read_text(text)  # a missing text is refused here, as in process
        res = run_child(lc, MODULE, "evaluate_many", {
            "quants": [str(q) for q in quants], "text": str(text), "cfg": asdict(cfg),
            "base": str(base) if base else None, "progress": progress})
        return [EvalResult(**r) for r in res]
    raw = _read_text(text)
    if not quants:
        return []
    with ChunkLogits(lc, cfg.ctx) as logits:
        return _evaluate_groups(quants, base, lc, cfg,
                                _Pass(text=text, raw=raw, device=device, logits=logits,
                                      progress=progress))


@dataclass(frozen=True, kw_only=True)
class _Pass:
    """One evaluation pass: the text (its path and bytes), the llama.cpp device, the reader of
    chunk logits, progress bars or not."""

    text: Path
    raw: bytes
    device: str
    logits: ChunkLogits
    progress: bool


def _evaluate_groups(quants: list[Path], base: Path | None, lc: LlamaCpp, cfg: EvalConfig,
                     run: _Pass) -> list[EvalResult]:
    device, logits, progress = run.device, run.logits, run.progress
    # torch's threaded arithmetic when this process has loaded torch anyway (scoring, compare);
    # else numpy, which gives the same numbers (tests/evaluate/test_eval.py) without importing
    # torch for a few seconds (`eval`, and convert's check after a --scores file or a cache hit)
    ops: Any = _TorchOps() if "torch" in sys.modules and not in_child() else _NumpyOps()
    results: list[EvalResult] = []
    b = load_gguf(lc, base, cfg.ctx, device, cfg.threads) if base else None
    base_real = base.resolve() if base else None
    tokens: Any = None
    n_chunks, add_bos, bos = 0, False, 0
    for group in _groups(quants, base, cfg.memory_budget or _memory_budget(device)):
        # the base itself, listed as a quant, is read from the base's logits (KLD 0)
        models = [None if quants[i].resolve() == base_real
                  else load_gguf(lc, quants[i], cfg.ctx, device, cfg.threads) for i in group]
        if b is not None and base is not None:
            for i, m in zip(group, models):
                if m is not None:
                    _same_model(quants[i], m, base, b)
        if tokens is None:
            first = b if b is not None else models[0]
            assert first is not None  # (a quant that is the base is there only beside it)
            tokens = first.tokenize(run.raw, add_bos=True, special=False)
            n_chunks = min(cfg.chunks or 1 << 62, _whole_chunks(tokens, run.text, cfg.ctx))
            add_bos, bos = adds_bos(lc, first), first.token_bos()
        tallies = [_Tally() for _ in group]
        what = f"eval {len(group)} file(s)" if len(quants) > 1 else "eval"
        for c in tqdm(range(n_chunks), desc=f"{what} ({device})", unit="chunk",
                      disable=not progress, leave=False):
            chunk = list(tokens[c * cfg.ctx: (c + 1) * cfg.ctx])
            if add_bos:
                chunk[0] = bos
            targets = ops.ints(chunk[cfg.ctx // 2 + 1:])
            rows = ops.ints(range(len(targets)))
            if b is not None:
                lb = ops.log_softmax(logits(b, chunk))
                pb = ops.exp(lb)
                neg_entropy = (pb * lb).sum(-1)
                top_b = lb.argmax(-1)
            for m, tally in zip(models, tallies):
                lq = ops.log_softmax(logits(m, chunk)) if m is not None else lb
                tally.nll.append(-ops.f64(lq[rows, targets]))
                if b is not None:
                    tally.nll_base.append(-ops.f64(lb[rows, targets]))
                    tally.kld.append(ops.f64(neg_entropy - (pb * lq).sum(-1)))
                    tally.same.append(ops.numpy(lq.argmax(-1) == top_b))
        results += [tally.result(n_chunks, device) for tally in tallies]
        del models
    return results


def evaluate(quant: Path, text: Path, lc: LlamaCpp, cfg: EvalConfig = EvalConfig(),
             base: Path | None = None, progress: bool = True) -> EvalResult:
    return evaluate_many([quant], text, lc, cfg, base, progress)[0]


def check_perplexity(gguf: Path, text: Path, ctx: int = 128, chunks: int = 4) -> float:
    """The check `convert` runs on a file it wrote: PPL over ``chunks`` x ``ctx`` tokens of
    ``text`` in llama.cpp on the CPU (llama-perplexity's protocol; a file llama.cpp cannot load is
    refused by the probe, without taking this process down)."""
    from lwq_gguf.llamacpp import find_llama_cpp

    return evaluate(gguf, text, find_llama_cpp(), EvalConfig(ctx=ctx, chunks=chunks),
                    progress=False).ppl


def _child_check_text(lc: LlamaCpp, a: dict) -> int:
    return check_text(Path(a["gguf"]), Path(a["text"]), lc, a["ctx"])


def _child_evaluate_many(lc: LlamaCpp, a: dict) -> list[dict]:
    base = Path(a["base"]) if a["base"] else None
    return [r.to_dict() for r in evaluate_many([Path(q) for q in a["quants"]], Path(a["text"]), lc,
                                               EvalConfig(**a["cfg"]), base, a["progress"])]


if __name__ == "__main__":
    raise SystemExit(run_process(lambda: serve({"check_text": _child_check_text,
                                                "evaluate_many": _child_evaluate_many})))
