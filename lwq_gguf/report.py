"""Stage 6 - report: the short summary tables printed at the end of each command."""

from __future__ import annotations

from collections.abc import Sequence

from lwq_gguf.plan import Plan, tensor_nbytes


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
    return (f"BPW {plan.bpw():.3f} over the whole file (target {plan.config.avg_bits:g}, "
            f"strategy {plan.config.strategy}, levels {plan.pair[0]}/{plan.pair[1]}); "
            f"{plan.bpw(layers_only=True):.3f} over the repeating layers alone; "
            f"{plan.nbytes / 2**20:.1f} MiB of tensors")
