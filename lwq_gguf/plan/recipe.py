"""Plans that are given rather than made: a plan JSON (`lwq-gguf plan -o`) or the per-tensor
types of another GGUF of the same architecture and shapes (`convert --recipe`), checked against
this model's tensors."""

from __future__ import annotations

from pathlib import Path

from lwq_gguf.errors import PlanError
from lwq_gguf.files import read_user_text
from lwq_gguf.model.inventory import GGUFTensor
from lwq_gguf.plan.config import Plan, PlanConfig
from lwq_gguf.quant.gguf_file import read_back
from lwq_gguf.quant.tensors import tensor_nbytes
from lwq_gguf.quant.types import QUANT_TYPES


def check_plan_matches(plan: Plan, tensors: tuple[GGUFTensor, ...], source: str) -> None:
    want = {(t.name, t.shape) for t in tensors}
    have = {(t.name, t.shape) for t in plan.tensors}
    if want != have:
        odd = sorted(want ^ have)[0][0]
        raise PlanError(f"{source}: the plan does not match this model (tensor {odd!r} differs): "
                        "make the plan from this model")


def read_plan(path: Path, tensors: tuple[GGUFTensor, ...]) -> Plan:
    """A plan JSON (`lwq-gguf plan -o`), or any GGUF of the same model shape (--recipe): its
    per-tensor types."""
    try:
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return recipe_plan(path, tensors)
    except OSError:
        pass  # said by read_user_text, in its words
    text = read_user_text(path, "plan", "make one with `lwq-gguf plan`", PlanError)
    plan = Plan.from_json(text, str(path))
    check_plan_matches(plan, tensors, str(path))
    return plan


def _trim_ones(shape) -> tuple[int, ...]:
    """A ggml shape without its trailing dimensions of 1 (the writer leaves them out)."""
    dims = list(shape)
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def recipe_plan(path: Path, tensors: tuple[GGUFTensor, ...]) -> Plan:
    """The per-tensor types of another GGUF of the same architecture and shapes, as a plan."""
    info = read_back(path)
    arch = info.metadata.get("general.architecture", "?")
    fix = f"use a GGUF of this model's architecture and size (the recipe is {arch})"
    want = {t.name: t for t in tensors}
    odd = sorted(set(info.types) ^ set(want))
    if odd:
        where = "only in the recipe" if odd[0] in info.types else "missing from the recipe"
        raise PlanError(f"{path}: tensor {odd[0]!r} is {where} ({len(odd)} names differ): {fix}")
    for name, t in want.items():
        if _trim_ones(info.shapes[name]) != _trim_ones(t.shape):
            raise PlanError(f"{path}: {name} is {list(info.shapes[name])} there and "
                            f"{list(t.shape)} in this model: {fix}")
        if info.types[name] not in QUANT_TYPES:
            raise PlanError(f"{path}: {name} is {info.types[name]}, a type the pinned "
                            "llama.cpp cannot write: choose another recipe")
    types = tuple(info.types[t.name] for t in tensors)
    total = sum(t.numel for t in tensors)
    bpw = sum(tensor_nbytes(ty, t.shape) for t, ty in zip(tensors, types)) * 8 / total
    used = sorted({ty for t, ty in zip(tensors, types) if t.quantizable} or {"f16"},
                  key=lambda ty: QUANT_TYPES[ty].bpw)
    n_layers = 1 + max((t.layer for t in tensors if t.layer is not None), default=-1)
    cfg = PlanConfig(avg_bits=min(32.0, max(1.0, round(bpw, 4))))
    return Plan(cfg, tensors, types, tuple(range(n_layers)), (used[0], used[-1]),
                basis=f"recipe of {path.name}")
