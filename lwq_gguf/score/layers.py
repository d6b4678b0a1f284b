"""Layer scores: how much each decoder layer matters (the paper's LIM and ZD).

LIM (layer input modification), per decoder layer i: the cosine similarity between the hidden
state entering the layer and the one leaving it, per token, averaged over every calibration token,
negated: ``LIM_i = -mean_t cos(h_in[t], h_out[t])``. Values lie in [-1, 1]; higher means the layer
changes its input more, i.e. matters more. Measured in PyTorch with the model's own modules, one
decoder layer at a time (lwq_gguf/model/stream.py), so the final norm never enters the last layer's
output and memory stays at one layer plus the activations.

ZD (z-score distribution), per layer: each 2-D weight matrix of the layer is standardised by its
own mean and standard deviation, ``z = (w - mean) / std``; ZD is the share of the layer's matrix
weights with ``z > +1`` (one-sided, as in Dumitru et al. 2024). Higher ZD = more important.
The ZD pass also checks every weight of the model for NaN/Inf.

Calibration text: ``--calib FILE``, else the packaged excerpt of WikiText-2 *validation*
(``lwq_gguf/data/calibration.txt``), first ``--calib-tokens`` tokens, in windows of 512.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from lwq_gguf.errors import LwqError, ModelInputError
from lwq_gguf.files import atomic_output, sha256_file
from lwq_gguf.model.load import HFModel, iter_weights
from lwq_gguf.score.scores import ScoreConfig, Scores, sig6


def zd_scores(model: HFModel, progress: bool = True) -> tuple[float, ...]:
    """ZD per layer; reads every weight once and raises on NaN/Inf (naming the tensor)."""
    hits = np.zeros(model.n_layers)
    total = np.zeros(model.n_layers)
    refs = [r for r in model.tensors if len(r.shape) >= 2]
    bar = tqdm(iter_weights(model), total=len(refs), desc="ZD + weight check", unit="tensor",
               disable=not progress, leave=False)
    for ref, w in bar:
        if ref.layer is None:
            continue
        rows = w.reshape(w.shape[0], -1)
        step = max(1, (1 << 22) // rows.shape[1])  # blocks: no weight-sized float64 temporary
        blocks = [rows[i:i + step] for i in range(0, len(rows), step)]
        mean = np.float64(sum(b.sum(dtype=np.float64) for b in blocks) / w.size)
        std = np.sqrt(sum(np.square(b.astype(np.float64) - mean).sum() for b in blocks) / w.size)
        if std > 0:
            hits[ref.layer] += sum(int(np.count_nonzero(b > mean + std)) for b in blocks)
        total[ref.layer] += w.size
    return tuple(sig6(h / t) if t else 0.0 for h, t in zip(hits, total))


def _sum64(x) -> float:
    """Sum of a float32 tensor: float32 partial sums of 1,024, added in float64 (torch's float64
    reduction is ten times slower)."""
    import torch

    n = x.numel() // 1024 * 1024
    head = float(x[:n].view(-1, 1024).sum(1).to(torch.float64).sum()) if n else 0.0
    return head + float(x[n:].to(torch.float64).sum())


class ZDInspector:
    """ZD per layer and the NaN/Inf check, on weights as :class:`LayerStream` reads them (the
    fused scoring pass): the same numbers as :func:`zd_scores`, from the same float32 values."""

    def __init__(self, n_layers: int) -> None:
        self.hits = np.zeros(n_layers)
        self.total = np.zeros(n_layers)

    def __call__(self, ref, w) -> None:
        import torch

        if len(ref.shape) < 2:
            return
        flat = w.reshape(-1)
        n = flat.numel()
        total = _sum64(flat)
        if not np.isfinite(total):  # a NaN or Inf anywhere makes the sum one
            bad = int(n - torch.isfinite(flat).sum())
            raise ModelInputError(f"{ref.file}: tensor {ref.name!r} has {bad} NaN/Inf values: "
                                  "the checkpoint is damaged; re-download or re-export it")
        if ref.layer is None:
            return
        mean = total / n
        step = 1 << 22  # blocks: no weight-sized temporary
        std = (sum(_sum64((flat[i:i + step] - mean).square_()) for i in range(0, n, step))
               / n) ** 0.5
        if std > 0:
            self.hits[ref.layer] += int(torch.count_nonzero(flat > mean + std))
        self.total[ref.layer] += n

    def scores(self) -> tuple[float, ...]:
        return tuple(sig6(h / t) if t else 0.0 for h, t in zip(self.hits, self.total))


def torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LwqError("--device cuda: PyTorch sees no CUDA GPU here: use --device cpu, or install "
                       "a CUDA build of torch on a machine with a GPU")
    if device not in ("cpu", "cuda"):
        raise LwqError(f"--device {device!r}: use auto, cpu or cuda")
    return device


def matmul_precision(precision: str, device: str) -> str:
    """"bf16" or "fp32" for the model pass on ``device`` (cpu | cuda): ``auto`` takes bf16 where
    the device multiplies it natively - a CUDA GPU that supports it, a CPU with AVX512-BF16 or
    AMX (Linux: /proc/cpuinfo; 2-3x fp32's speed there) - and fp32 elsewhere."""
    if precision != "auto":
        return precision
    import torch

    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def autocast(torch, device: str, precision: str):
    """The context the model pass runs its matmuls in (``precision``: bf16 or fp32)."""
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")


def prefix_ids(tok, text: str, n: int, margin: int = 64) -> list[int]:
    """The first n tokens of ``text``, tokenizing only a prefix (a 1 MB text takes seconds whole).

    The prefix ends at a line break and grows until it yields n + margin tokens, so the tokens
    kept are never near the cut and equal those of the whole text (tests/model/test_stream.py).
    """
    size = max(4096, 8 * (n + margin))
    while True:
        cut = text.rfind("\n", 0, size) if size < len(text) else len(text)
        ids = tok(text[: cut if cut > 0 else size], add_special_tokens=False, verbose=False,
                  split_special_tokens=True)["input_ids"]
        if size >= len(text) or len(ids) >= n + margin:
            return ids[:n]
        size *= 2


def calibration_ids(model: HFModel, cfg: ScoreConfig) -> list[int]:
    """The calibration tokens as llama-imatrix and llama-perplexity read a text: special-token
    strings in it (WikiText's literal ``<unk>``) are text, not the special tokens, and where the
    model's tokenizer adds BOS every window of ``cfg.seq_len`` starts with it (its first token
    replaced, as those tools do with each chunk)."""
    from transformers import AutoTokenizer

    file = cfg.calib_file
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LwqError(f"{file}: cannot read calibration text ({e.strerror}): pass --calib "
                       "FILE") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(model.path))
    except (OSError, ValueError) as e:
        raise ModelInputError(f"{model.path}: no usable tokenizer ({str(e).splitlines()[0][:120]}): "
                              "LIM needs the model's tokenizer files; or use --strategy zd|random") from None
    ids = prefix_ids(tok, text, cfg.calib_tokens)
    if len(ids) < 16:
        raise LwqError(f"{file}: calibration text too short ({len(ids)} tokens): give a longer text")
    bos = tok.bos_token_id
    if bos is not None and tok("a")["input_ids"][:1] == [bos]:  # the model's text starts with BOS
        for i in range(0, len(ids), cfg.seq_len):
            ids[i] = bos
    return ids


def lim_scores(model: HFModel, cfg: ScoreConfig, ids: list[int], progress: bool = True
               ) -> tuple[tuple[float, ...], str]:
    """LIM per layer over ``ids`` (windows of cfg.seq_len); returns (scores, device used).

    Streamed (lwq_gguf/model/stream.py): one decoder layer's weights in memory at a time, every
    window's hidden state pushed through it, so memory is one layer + the activations."""
    import torch

    from lwq_gguf.model.stream import LayerStream

    device = torch_device(cfg.device)
    torch.manual_seed(0)
    stream = LayerStream(model, device, cfg.seq_len, cfg.device_map)
    windows = [ids[s: s + cfg.seq_len] for s in range(0, len(ids), cfg.seq_len)]
    sums = [0.0] * model.n_layers
    count = sum(len(w) for w in windows)
    with torch.no_grad():
        hs = stream.embed(windows)
        for i, layer in enumerate(tqdm(stream.layers, desc=f"LIM ({device})", unit="layer",
                                       disable=not progress, leave=False)):
            stream.load(layer, f"model.layers.{i}")
            for j, h in enumerate(hs):
                h = h.to(stream.device_of(layer))
                out = stream.run_layer(layer, h)
                cos = torch.nn.functional.cosine_similarity(h.float(), out.float(), dim=-1)
                sums[i] += float(cos.double().sum())
                hs[j] = out
            stream.unload(layer)
    lim = tuple(sig6(-(s / count)) for s in sums)
    return lim, device


def score_model(model: HFModel, cfg: ScoreConfig, model_sha256: str, progress: bool = True
                ) -> Scores:
    """LIM and ZD of ``model`` (whose content digest is ``model_sha256``)."""
    zd = zd_scores(model, progress)
    file = cfg.calib_file
    if model.arch is None:  # no forward pass: ZD only (plans from weight error, score.weights)
        return Scores(model.architecture, model.n_layers, (), zd, file.name, sha256_file(file),
                      0, "none", model_sha256)
    ids = calibration_ids(model, cfg)
    lim, device = lim_scores(model, cfg, ids, progress)
    return Scores(model.architecture, model.n_layers, lim, zd, file.name, sha256_file(file),
                  len(ids), device, model_sha256)


def plot_scores(scores: Scores, png: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(scores.n_layers)
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    a.bar(x, scores.lim or np.zeros(scores.n_layers), color="tab:blue")
    a.set_ylabel("LIM (-cos)" if scores.lim else "LIM: no forward pass")
    a.set_title(title or f"layer importance, {scores.architecture}, {scores.calib_tokens} calib tokens")
    b.bar(x, scores.zd, color="tab:orange")
    b.set_ylabel("ZD (share z>1)")
    b.set_xlabel("decoder layer")
    fig.tight_layout()
    with atomic_output(png) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
