"""llama.cpp's own mixes as plans: the type ``llama-quantize`` gives each tensor of this model for a
preset (Q4_K_M, IQ3_M ...), and the plan that writes exactly its file.

The recipe is read from ``llama-quantize --dry-run`` on a stub of the model's 16-bit GGUF (the
converter's header, metadata and tensor infos, the data a sparse hole: no weight is read or
written), so it is llama.cpp's own choice at the pin - fallbacks, the tied embedding, its
per-architecture rules - without a 16-bit file. Recipes are cached in
``scores_cache_dir()/mixes`` by the model's config and tensor list, the llama.cpp install and the
code that reads them.

:func:`mix_plan` turns a recipe into a :class:`Plan` whose file is llama-quantize's own, byte for
byte (ggml's encoder, the preset's file type, no lwq.* keys): the candidate
:mod:`lwq_gguf.plan.guard` sets beside the planned file.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from lwq_gguf.errors import ToolError
from lwq_gguf.files import code_digest, scores_cache_dir, write_cache_text
from lwq_gguf.llamacpp import LlamaCpp, find_llama_cpp, run_tool
from lwq_gguf.model import inventory as inventory_stage
from lwq_gguf.model.inventory import ConverterJob, GGUFTensor, run_job
from lwq_gguf.model.load import HFModel
from lwq_gguf.plan.config import Plan
from lwq_gguf.quant.types import FLOAT_TYPES, QUANT_TYPES

# llama-quantize --dry-run, one line per tensor (src/llama-quant.cpp at the pin):
# "[  12/ 183]  blk.0.attn_q.weight  - [  640,  1024,  1,  1], type =    f16, size =  1.250 MiB ->
#  0.352 MiB (q4_K)"; a tensor it keeps ends at "size = 0.002 MiB"
_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type =\s*(\S+),\s+size =[^(]*"
                   r"(?:\((\S+)\))?\s*$")


def parse_dry_run(text: str) -> dict[str, str]:
    """{tensor name: type} from ``llama-quantize --dry-run`` output (types as QUANT_TYPES names)."""
    types = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            types[m.group(1)] = (m.group(3) or m.group(2)).lower()
    return types


def _key(model: HFModel, tensors: Sequence[GGUFTensor], lc: LlamaCpp) -> str:
    parts = {"config": model.config_json,
             "tensors": [[t.name, list(t.shape), t.src_type] for t in tensors],
             "install": str(lc.root.resolve()),
             "code": code_digest("plan/mixes.py", "model/inventory.py")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _valid(types, tensors: Sequence[GGUFTensor]) -> bool:
    return (isinstance(types, dict) and set(types) == {t.name for t in tensors}
            and all(v in QUANT_TYPES for v in types.values()))


def mix_recipes(model: HFModel, tensors: Sequence[GGUFTensor],
                mixes: Sequence[str]) -> dict[str, dict[str, str]]:
    """{mix: {tensor: type}}: what llama-quantize at the pin gives each tensor for each preset."""
    lc = find_llama_cpp()
    folder = scores_cache_dir() / "mixes"
    key = _key(model, tensors, lc)
    out: dict[str, dict[str, str]] = {}
    for mix in mixes:
        try:
            types = json.loads((folder / f"{key}-{mix}.json").read_text())
        except (OSError, ValueError):
            continue
        if _valid(types, tensors):
            out[mix] = types
    missing = [m for m in mixes if m not in out]
    if not missing:
        return out
    with tempfile.TemporaryDirectory(prefix="lwq-mix-") as tmp:
        stub = Path(tmp) / "stub.gguf"
        run_job(ConverterJob(mode="stub", src=str(lc.src), model=str(model.path), out=str(stub)),
                inventory_stage.__name__)
        for mix in missing:
            text = run_tool([str(lc.tool("llama-quantize")), "--dry-run", str(stub), mix],
                            what=f"llama-quantize --dry-run {mix} on {model.path}")
            types = parse_dry_run(text)
            if not _valid(types, tensors):
                raise ToolError(f"llama-quantize --dry-run {mix} on {model.path}: its tensor list "
                                "is not the converter's: report this bug")
            write_cache_text(folder / f"{key}-{mix}.json", json.dumps(types))
            out[mix] = types
    return out


def mix_plan(plan: Plan, mix: str, types: Mapping[str, str]) -> Plan:
    """The plan that writes llama-quantize's own ``mix`` file of the model ``plan`` is for."""
    tys = tuple(types[t.name] for t in plan.tensors)
    used = sorted({ty for t, ty in zip(plan.tensors, tys) if t.quantizable} or {"f16"},
                  key=lambda ty: QUANT_TYPES[ty].bpw)
    return replace(plan, config=replace(plan.config, encoder="ggml"), types=tys,
                   pair=(used[0], used[-1]), basis="", mix=mix)


def estimated_damage(plan: Plan, damage: Mapping[str, Mapping[str, float]]) -> float | None:
    """The planner's estimate of a plan's KLD (the sum of its tensors' measured damage), or None
    when a type it uses was not measured for that tensor."""
    total = 0.0
    for t, ty in zip(plan.tensors, plan.types):
        if not t.quantizable or ty in FLOAT_TYPES:
            continue
        d = damage.get(t.name, {}).get(ty)
        if d is None:
            return None
        total += d
    return total
