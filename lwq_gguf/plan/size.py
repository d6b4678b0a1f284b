"""--size: the planning decisions that land a file at a size on disk. A first --avg-bits for the
size (:func:`size_target`), then plans lowered while the planned file would not fit
(:func:`fit_size`), its bytes predicted exactly from the converter's header size, the plan's
tensors and the metadata lwq-gguf adds (:func:`predicted_bytes`, :func:`lwq_metadata`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace

from lwq_gguf import __version__
from lwq_gguf.errors import PlanError
from lwq_gguf.model.inventory import Inventory
from lwq_gguf.plan.budget import ALIGN, IMATRIX_KV_MAX, file_bytes, in_unit_of, kv_bytes, pad
from lwq_gguf.plan.config import Plan, PlanConfig, reach_bytes

SIZE_SLACK = 0.005  # --size: the file lands at or below the size, within this fraction of it


@dataclass(frozen=True, kw_only=True)
class SizeLimit:
    bytes: int  # the file at or below this on disk, within SIZE_SLACK of it
    spec: str  # as the user wrote it (4.2GiB), for messages in its unit


def lwq_metadata(plan: Plan, scores_json: str | None) -> dict:
    """The lwq.* metadata a file gets: version, target, the plan and (``scores_json``: a Scores
    JSON) the layer scores, their sensitivity tables and imatrix left out."""
    kv = {"lwq.version": __version__, "lwq.avg_bits": float(plan.config.avg_bits),
          "lwq.plan": json.dumps(plan.to_dict(), separators=(",", ":"))}
    if scores_json is not None:
        d = {k: v for k, v in json.loads(scores_json).items()
             if k not in ("sensitivity", "imatrix")}
        kv["lwq.scores"] = json.dumps(d, separators=(",", ":"))
    return kv


def predicted_bytes(header_bytes: int, plan: Plan, scores_json: str | None, imatrix: bool) -> int:
    """The planned file's size on disk, at most (exact but for the imatrix keys' strings and
    any dimension of 1 the writer drops)."""
    # (a llama.cpp preset's own recipe, plan.mix, is written without the lwq.* keys)
    lwq = 0 if plan.mix else kv_bytes(lwq_metadata(plan, scores_json))
    extra = lwq + (IMATRIX_KV_MAX if imatrix else 0)
    return file_bytes(header_bytes, plan.tensor_bytes(), extra)


def size_target(inv: Inventory, limit: SizeLimit, cfg: PlanConfig, imatrix: bool) -> float:
    """A first --avg-bits for a file of at most ``limit`` bytes; a size this model's file cannot
    have under ``cfg``'s ladder is refused with the range it can, in the unit the user wrote.
    (:func:`fit_size` then plans, measures the planned file and plans again lower while it
    would not fit.)"""
    n, total = len(inv.tensors), sum(t.numel for t in inv.tensors)
    lo, hi = reach_bytes(inv.tensors, cfg, imatrix)
    # the metadata lwq-gguf adds (the plan: ~100 bytes a tensor) and every tensor's padding
    over = pad(inv.header_bytes + 100 * n + 4096 + (IMATRIX_KV_MAX if imatrix else 0)) + ALIGN * n
    size, spec = limit.bytes, limit.spec
    if not lo + over <= size <= hi + over:
        raise PlanError(f"--size {spec}: with ladder {','.join(cfg.ladder)} this model's file "
                        f"takes {in_unit_of(lo + over, spec)} to {in_unit_of(hi + over, spec)}: "
                        "choose a size in that range (or widen the ladder)")
    return (size - over) * 8 / total


def fit_size(cfg: PlanConfig, limit: SizeLimit, inv: Inventory, imatrix: bool,
             scores_json: str | None, make: Callable[[PlanConfig], Plan]) -> Plan:
    """The plan ``make(cfg)`` for ``limit``: the target lowered while the planned file would not
    fit; refused when the closest the tensors allow is more than SIZE_SLACK below."""
    total = sum(t.numel for t in inv.tensors)
    for _ in range(4):
        plan = make(cfg)
        need = predicted_bytes(inv.header_bytes, plan, scores_json, imatrix)
        if need <= limit.bytes:
            break
        cfg = replace(cfg, avg_bits=cfg.avg_bits - (need - limit.bytes + ALIGN) * 8 / total)
    else:
        raise PlanError(f"--size {limit.spec}: the planned file stays above it "
                        f"({in_unit_of(need, limit.spec)}): choose a larger size")
    if need < limit.bytes * (1 - SIZE_SLACK):
        raise PlanError(f"--size {limit.spec}: the closest this model's tensors allow is "
                        f"{in_unit_of(need, limit.spec)}, more than {SIZE_SLACK:.1%} below: "
                        "choose a size nearer that")
    return plan
