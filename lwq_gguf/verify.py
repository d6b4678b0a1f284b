"""Stage 5 - verify: read a written GGUF back and let llama.cpp run it.

``read_back`` lists each tensor's type and the file's BPW with gguf-py (llama.cpp's definition:
tensor bytes * 8 / tensor elements). ``check_file`` compares the types with the plan and runs a
short ``llama-perplexity`` (4 chunks of 128 tokens of the calibration text), which must be finite.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from lwq_gguf.errors import LwqError, VerifyError
from lwq_gguf.llamacpp import LlamaCpp, run_tool
from lwq_gguf.plan import Plan


@dataclass(frozen=True)
class FileInfo:
    types: dict[str, str]  # tensor name -> lower-case type name
    nbytes: int
    nelements: int
    metadata: dict[str, object]

    @property
    def bpw(self) -> float:
        return self.nbytes * 8 / self.nelements


def read_back(path: Path) -> FileInfo:
    from gguf import GGUFReader, GGUFValueType

    try:
        r = GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise LwqError(f"{path}: not a readable GGUF file ({e}): re-create it")
    types, nbytes, nel = {}, 0, 0
    for t in r.tensors:
        types[t.name] = t.tensor_type.name.lower()
        nbytes += int(t.n_bytes)
        nel += int(t.n_elements)
    meta = {}
    for key, f in r.fields.items():
        if key.startswith(("lwq.", "general.", "quantize.")):
            if f.types and f.types[0] == GGUFValueType.STRING:
                meta[key] = bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
            elif f.types and f.types[0] != GGUFValueType.ARRAY:
                meta[key] = f.parts[f.data[0]].tolist()[0]
    return FileInfo(types, nbytes, nel, meta)


def short_perplexity(lc: LlamaCpp, gguf: Path, text: Path, ctx: int = 128, chunks: int = 4,
                     threads: int = 0) -> float:
    """A few chunks of llama-perplexity on the CPU; returns the final PPL estimate."""
    cmd = [str(lc.tool("llama-perplexity")), "-m", str(gguf), "-f", str(text), "-c", str(ctx),
           "-b", str(ctx), "--chunks", str(chunks), "-ngl", "0"]
    if threads:
        cmd += ["-t", str(threads)]
    out = run_tool(cmd, what=f"llama-perplexity on {gguf.name}")
    m = re.search(r"Final estimate: PPL = ([0-9.eE+\-naif]+)", out)
    if not m:
        raise VerifyError(f"{gguf}: llama-perplexity printed no estimate: run it by hand to see why")
    return float(m.group(1))


@dataclass(frozen=True)
class CheckResult:
    bpw: float
    ppl: float | None


def check_file(lc: LlamaCpp, path: Path, plan: Plan, text: Path | None, shown_as: Path) -> CheckResult:
    info = read_back(path)
    want = dict(zip((t.name for t in plan.tensors), plan.types))
    if set(info.types) != set(want):
        odd = sorted(set(info.types) ^ set(want))[0]
        raise VerifyError(f"{shown_as}: tensor {odd!r} is not where the plan says: report this bug")
    for name, ty in want.items():
        if info.types[name] != ty:
            raise VerifyError(f"{shown_as}: tensor {name!r} is {info.types[name]}, plan says {ty}: "
                              "report this bug (or pass --no-verify to keep the file)")
    ppl = None
    if text is not None:
        ppl = short_perplexity(lc, path, text)
        if not math.isfinite(ppl):
            raise VerifyError(f"{shown_as}: llama.cpp perplexity is {ppl}: the file is broken; "
                              "pass --no-verify to keep it for inspection")
    return CheckResult(info.bpw, ppl)
