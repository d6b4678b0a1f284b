"""Stage 2 - score: how much each decoder layer matters.

LIM (layer input modification), per decoder layer i: the cosine similarity between the hidden
state entering the layer and the one leaving it, per token, averaged over every calibration token,
negated: ``LIM_i = -mean_t cos(h_in[t], h_out[t])``. Values lie in [-1, 1]; higher means the layer
changes its input more, i.e. matters more. Measured in PyTorch with the model's own modules, one
decoder layer at a time (lwq_gguf/stream.py), so the final norm never enters the last layer's
output and memory stays at one layer plus the activations.

ZD (z-score distribution), per layer: each 2-D weight matrix of the layer is standardised by its
own mean and standard deviation, ``z = (w - mean) / std``; ZD is the share of the layer's matrix
weights with ``z > +1`` (one-sided, as in Dumitru et al. 2024). Higher ZD = more important.
The ZD pass also checks every weight of the model for NaN/Inf.

Calibration text: ``--calib FILE``, else the packaged excerpt of WikiText-2 *validation*
(``lwq_gguf/data/calibration.txt``), first ``--calib-tokens`` tokens, in windows of 512.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lwq_gguf import __version__
from lwq_gguf.errors import LwqError, ModelInputError
from lwq_gguf.load import HFModel, iter_weights

SCORES_FORMAT, SCORES_VERSION = "lwq-gguf.scores", 1


def default_calibration() -> Path:
    return Path(str(resources.files("lwq_gguf") / "data" / "calibration.txt"))


@dataclass(frozen=True)
class ScoreConfig:
    calib: Path | None = None  # None: the packaged WikiText-2 validation excerpt
    calib_tokens: int = 4096
    seq_len: int = 512
    device: str = "auto"  # auto | cpu | cuda
    device_map: str = "none"  # auto: pieces resident on all GPUs, as accelerate places them
    # --rescore: measure again instead of reusing the score cache (lwq_gguf/scorecache.py)
    rescore: bool = field(default=False, compare=False, repr=False)

    @property
    def calib_file(self) -> Path:
        return self.calib or default_calibration()


def sig6(x: float) -> float:
    """6 significant digits: scores (and so plans and files) do not depend on float noise."""
    return float(f"{x:.6g}")


@dataclass(frozen=True)
class Scores:
    architecture: str
    n_layers: int
    lim: tuple[float, ...]
    zd: tuple[float, ...]
    calib_file: str
    calib_sha256: str
    calib_tokens: int
    device: str
    tool_version: str = __version__
    # strategy auto: {"tokens", "seconds", "damage": {imatrix key: {tensor: {type: KLD}}}}
    sensitivity: dict | None = field(default=None, compare=False)
    imatrix: dict | None = field(default=None, compare=False)  # imatrix_to_dict form

    def damage(self, key: str) -> dict | None:
        return (self.sensitivity or {}).get("damage", {}).get(key)

    def to_json(self) -> str:
        d = {"format": SCORES_FORMAT, "version": SCORES_VERSION, **asdict(self)}
        d["lim"], d["zd"] = list(self.lim), list(self.zd)
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "scores") -> Scores:
        try:
            d = json.loads(text)
            if d.get("format") != SCORES_FORMAT or d.get("version") != SCORES_VERSION:
                raise ValueError("not an lwq-gguf scores file")
            fields = {k: d[k] if k not in ("sensitivity", "imatrix") else d.get(k)
                      for k in cls.__dataclass_fields__}
            fields["lim"], fields["zd"] = tuple(fields["lim"]), tuple(fields["zd"])
            s = cls(**fields)
            if len(s.lim) != s.n_layers or len(s.zd) != s.n_layers:
                raise ValueError("score lists do not match n_layers")
            return s
        except (ValueError, KeyError, TypeError) as e:
            raise LwqError(f"{source}: corrupt scores file ({e}): make it with `lwq-gguf score`")

    def check_model(self, model: HFModel, source: str) -> None:
        if (self.architecture, self.n_layers) != (model.architecture, model.n_layers):
            raise LwqError(f"{source}: scores are for a {self.n_layers}-layer {self.architecture}, "
                           f"not {model.path} ({model.n_layers}-layer {model.architecture}): "
                           "score this model")


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


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LwqError("--device cuda: PyTorch sees no CUDA GPU here: use --device cpu, or install "
                       "a CUDA build of torch on a machine with a GPU")
    if device not in ("cpu", "cuda"):
        raise LwqError(f"--device {device!r}: use auto, cpu or cuda")
    return device


def prefix_ids(tok, text: str, n: int, margin: int = 64) -> list[int]:
    """The first n tokens of ``text``, tokenizing only a prefix (a 1 MB text takes seconds whole).

    The prefix ends at a line break and grows until it yields n + margin tokens, so the tokens
    kept are never near the cut and equal those of the whole text (tests/test_stream.py).
    """
    size = max(4096, 8 * (n + margin))
    while True:
        cut = text.rfind("\n", 0, size) if size < len(text) else len(text)
        ids = tok(text[: cut if cut > 0 else size], add_special_tokens=False, verbose=False)["input_ids"]
        if size >= len(text) or len(ids) >= n + margin:
            return ids[:n]
        size *= 2


def calibration_ids(model: HFModel, cfg: ScoreConfig) -> list[int]:
    from transformers import AutoTokenizer

    file = cfg.calib_file
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LwqError(f"{file}: cannot read calibration text ({e.strerror}): pass --calib FILE")
    try:
        tok = AutoTokenizer.from_pretrained(str(model.path))
    except (OSError, ValueError) as e:
        raise ModelInputError(f"{model.path}: no usable tokenizer ({str(e).splitlines()[0][:120]}): "
                              "LIM needs the model's tokenizer files; or use --strategy zd|random")
    ids = prefix_ids(tok, text, cfg.calib_tokens)
    if len(ids) < 16:
        raise LwqError(f"{file}: calibration text too short ({len(ids)} tokens): give a longer text")
    return ids


def lim_scores(model: HFModel, cfg: ScoreConfig, ids: list[int], progress: bool = True
               ) -> tuple[tuple[float, ...], str]:
    """LIM per layer over ``ids`` (windows of cfg.seq_len); returns (scores, device used).

    Streamed (lwq_gguf/stream.py): one decoder layer's weights in memory at a time, every
    window's hidden state pushed through it, so memory is one layer + the activations."""
    import torch

    from lwq_gguf.stream import LayerStream

    device = resolve_device(cfg.device)
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


def score_model(model: HFModel, cfg: ScoreConfig, progress: bool = True) -> Scores:
    zd = zd_scores(model, progress)
    ids = calibration_ids(model, cfg)
    lim, device = lim_scores(model, cfg, ids, progress)
    file = cfg.calib_file
    return Scores(model.architecture, model.n_layers, lim, zd, file.name,
                  hashlib.sha256(file.read_bytes()).hexdigest(), len(ids), device)


def plot_scores(scores: Scores, png: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(scores.n_layers)
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    a.bar(x, scores.lim, color="tab:blue")
    a.set_ylabel("LIM (-cos)")
    a.set_title(title or f"layer importance, {scores.architecture}, {scores.calib_tokens} calib tokens")
    b.bar(x, scores.zd, color="tab:orange")
    b.set_ylabel("ZD (share z>1)")
    b.set_xlabel("decoder layer")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
