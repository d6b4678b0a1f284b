"""Stage 5 - verify: read a written GGUF back and let llama.cpp run it.

``check_file`` reads the file's header back (:func:`lwq_gguf.quant.gguf_file.read_back`),
compares its types with the plan and runs the file in llama.cpp
(:func:`lwq_gguf.evaluate.perplexity.check_perplexity`, 4 chunks of 128 tokens of the
calibration text, in the torch-free child), whose PPL must be finite. (Not the
``llama-perplexity`` tool: at the pinned build it logs from a thread the process does not join at
exit, and now and then a run that succeeded loses its last lines, ``Final estimate`` among them.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lwq_gguf.errors import LwqError, VerifyError
from lwq_gguf.evaluate.perplexity import check_perplexity
from lwq_gguf.plan.plan import Plan
from lwq_gguf.quant.gguf_file import read_back


@dataclass(frozen=True)
class CheckResult:
    bpw: float
    ppl: float | None


def check_file(path: Path, plan: Plan, text: Path | None, shown_as: Path) -> CheckResult:
    """The file's types against the plan, then (with ``text``) a short llama.cpp run of it
    (:func:`lwq_gguf.evaluate.perplexity.check_perplexity`): a finite PPL or one VerifyError."""
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
        try:
            ppl = check_perplexity(path, text)
        except LwqError as e:
            raise VerifyError(f"{shown_as}: llama.cpp cannot run the file ({e}); pass --no-verify "
                              "to keep it for inspection") from None
        if not math.isfinite(ppl):
            raise VerifyError(f"{shown_as}: llama.cpp perplexity is {ppl}: the file is broken; "
                              "pass --no-verify to keep it for inspection")
    return CheckResult(info.bpw, ppl)
