"""Report: the short summary tables printed at the end of each command, and the plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lwq_gguf.evaluate.metrics import metrics
from lwq_gguf.files import atomic_output
from lwq_gguf.plan.budget import dense_budget
from lwq_gguf.plan.plan import TOLERANCE, Plan
from lwq_gguf.quant.tensors import tensor_nbytes


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(r):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def plan_types_table(plan: Plan) -> str:
    total = sum(t.numel for t in plan.tensors)
    agg: dict[str, list[int]] = {}
    for t, ty in zip(plan.tensors, plan.types):
        a = agg.setdefault(ty, [0, 0, 0])
        a[0] += 1
        a[1] += t.numel
        a[2] += tensor_nbytes(ty, t.shape)
    rows = [(ty, n, f"{e / 1e6:.2f}M", f"{100 * e / total:.1f}%", f"{b / 2**20:.2f}")
            for ty, (n, e, b) in sorted(agg.items(), key=lambda kv: -kv[1][1])]
    return table(("type", "tensors", "params", "share", "MiB"), rows)


def plan_layers_table(plan: Plan, lim: Sequence[float] | None) -> str:
    """Per decoder layer: rank, LIM, BPW and the type of each tensor kind."""
    kinds: list[str] = []
    per: dict[int, dict[str, str]] = {}
    bits: dict[int, list[int]] = {}
    for t, ty in zip(plan.tensors, plan.types):
        if t.layer is None or not t.quantizable:
            continue
        if t.kind not in kinds:
            kinds.append(t.kind)
        per.setdefault(t.layer, {})[t.kind] = ty
        b = bits.setdefault(t.layer, [0, 0])
        b[0] += tensor_nbytes(ty, t.shape) * 8
        b[1] += t.numel
    rank = {layer: i + 1 for i, layer in enumerate(plan.layer_order)}
    rows = []
    for layer in sorted(per):
        score = f"{lim[layer]:.4f}" if lim else "-"
        rows.append([layer, rank[layer], score, f"{bits[layer][0] / bits[layer][1]:.2f}"]
                    + [per[layer].get(k, "") for k in kinds])
    return table(["layer", "rank", "LIM", "BPW"] + kinds, rows)


def plan_summary(plan: Plan) -> str:
    if plan.mix:
        return (f"llama.cpp's own {plan.mix}: BPW {plan.bpw():.3f} over the whole file (target "
                f"{plan.config.avg_bits:g}), levels {plan.pair[0]}/{plan.pair[1]}, "
                f"{plan.nbytes / 2**20:.1f} MiB of tensors; the file is llama-quantize's, byte "
                "for byte")
    line = (f"BPW {plan.bpw():.3f} over the whole file (target {plan.config.avg_bits:g}, "
            f"strategy {plan.config.strategy}{': ' + plan.basis if plan.basis else ''}, "
            f"levels {plan.pair[0]}/{plan.pair[1]}); "
            f"{plan.bpw(layers_only=True):.3f} over the repeating layers alone; "
            f"{plan.nbytes / 2**20:.1f} MiB of tensors")
    if plan.config.strategy == "auto" and plan.bpw() < plan.config.avg_bits - TOLERANCE:
        line += ("\nsmaller than the target: every file nearer to it has more estimated damage "
                 "(a larger type adds damage - weights already on a smaller type's grid - or a "
                 "large tensor's next type does not fit)")
    dense = plan.dense_nbytes
    if dense < plan.nbytes:  # a mixture of experts: both parts, as -ot exps=CPU places them
        limit = dense_budget(plan.tensors, plan.config.dense_bytes, plan.config.dense_bits)
        line += (f"\nnon-expert part {dense / 2**20:.1f} MiB"
                 + (f" (limit {limit / 2**20:.1f} MiB)" if limit is not None else "")
                 + f", routed experts {(plan.nbytes - dense) / 2**20:.1f} MiB")
    return line


def machine() -> str:
    """One line naming this machine: CPU model, cores, memory (and the GPU when torch sees one)."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        with open("/proc/meminfo") as f:
            mem = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal:"))) / 2**20
    except (OSError, StopIteration):
        mem = 0
    desc = f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.machine()}"
    try:
        import torch

        if torch.cuda.is_available():
            desc += f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return desc


_COMPARE_METRICS = metrics("kld_mean", "kld_p99", "same_top_pct")
COMPARE_HEADERS = ("file", "MiB", "BPW", "PPL", "ΔPPL", *(m.label for m in _COMPARE_METRICS))


def compare_rows(rows) -> list[list[str]]:
    """Table cells of compare's rows (see lwq_gguf.publish.compare.Row), sorted by BPW; the
    metrics as lwq_gguf.evaluate.metrics formats them."""
    ppl = metrics("ppl")[0]
    out = []
    for r in sorted(rows, key=lambda r: (r.kind != "base", r.bpw)):
        out.append([r.label, f"{r.size_mib:.1f}", f"{r.bpw:.3f}", ppl.cell(r.result),
                    f"{r.dppl:+.3f}", *("-" if r.kind == "base" else m.cell(r.result)
                                         for m in _COMPARE_METRICS)])
    return out


def eval_rows(result) -> list[tuple[str, str]]:
    """``lwq-gguf eval``'s table: (metric, value) for every metric measured."""
    return [(m.label, m.cell(result)) for m in metrics()
            if not m.vs_base or getattr(result, m.key) is not None]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def plot_compare(rows, png: Path, title: str) -> None:
    """Mean KLD against BPW (log KLD axis): llama.cpp's mixes one line, layer-wise another."""
    plot_kld({name: [(r.bpw, r.result.kld_mean, r.label) for r in rows if r.kind == kind]
              for kind, name in (("llama.cpp", "llama.cpp mixes"),
                                 ("lwq-gguf", "lwq-gguf layer-wise"))},
             png, "bits per weight (whole file)", title)


def plot_kld(lines: dict[str, list[tuple[float, float, str]]], png: Path, xlabel: str,
             title: str = "") -> None:
    """Mean KLD (log axis) against ``xlabel``: one labelled line per entry of ``lines``
    ({name: [(x, KLD, point label), ...]}; the first drawn with circles, the rest squares)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, (name, points) in enumerate(lines.items()):
        pts = sorted(p for p in points if p[1] and p[1] > 0)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if i == 0 else "s-", label=name,
                ms=5)
        for k, (x, y, label) in enumerate(pts):  # alternate sides so neighbours stay legible
            ax.annotate(label, (x, y), textcoords="offset points", fontsize=7,
                        xytext=(4, 5) if k % 2 == 0 else (4, -11))
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean KL-divergence vs 16-bit (log)")
    if title:
        ax.set_title(textwrap.fill(title, 90), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
