"""A torch-free child process for llama.cpp calls (see lwq_gguf.evaluate.perplexity's docstring).

The parent calls :func:`run_child` (``python -m MODULE`` with a JSON spec on stdin: {"call",
"lc": llama.cpp folder, "out": result path, "args": {...}}); the child module ends with
``serve({...handlers})``, which runs the call with LWQ_EVAL_CHILD=1 (numpy arithmetic, no further
isolation) and writes {"ok": result} or {"error": message} to ``out``, atomically.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from lwq_gguf.errors import LwqError
from lwq_gguf.files import atomic_output
from lwq_gguf.llamacpp import LlamaCpp


def in_child() -> bool:
    return os.environ.get("LWQ_EVAL_CHILD") == "1"


def isolated(lc: LlamaCpp) -> bool:
    """True when llama.cpp must run in a torch-free child (a CUDA build; or asked for)."""
    return not in_child() and (lc.has_cuda or os.environ.get("LWQ_EVAL_ISOLATE") == "1")


def run_child(lc: LlamaCpp, module: str, call: str, args: dict):
    """Run ``call`` of ``module`` (which ends with :func:`serve`) in a child process."""
    with tempfile.TemporaryDirectory(prefix="lwq-eval-") as tmp:
        out = Path(tmp) / "result.json"
        spec = json.dumps({"call": call, "lc": str(lc.root), "out": str(out), "args": args})
        here = str(Path(__file__).resolve().parents[2])  # lwq_gguf importable however we run
        env = dict(os.environ, LWQ_EVAL_CHILD="1", LLAMA_CPP_LIB_PATH=str(lc.bin),
                   PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
        p = subprocess.run([sys.executable, "-m", module], input=spec, text=True, env=env)
        if out.is_file():
            res = json.loads(out.read_text())
            if "error" in res:
                raise LwqError(res["error"])
            return res["ok"]  # written last: complete even if the exit itself went wrong
    how = f"signal {-p.returncode}" if p.returncode < 0 else f"exit status {p.returncode}"
    raise LwqError(f"llama.cpp ({lc.root}) ended with {how} while evaluating in a child process: "
                   "check the GPU driver and the build, or use --device cpu")


def serve(handlers: dict[str, Callable[[LlamaCpp, dict], object]]) -> int:
    """The child's side: read the spec from stdin, run the handler, write the result (exit
    code 0: the parent reads the outcome from the result)."""
    spec = json.loads(sys.stdin.read())
    try:
        res = {"ok": handlers[spec["call"]](LlamaCpp(Path(spec["lc"])), spec["args"])}
    except LwqError as e:
        res = {"error": str(e)}
    except KeyboardInterrupt:  # the parent gets it too and says so
        sys.exit(130)
    with atomic_output(Path(spec["out"])) as tmp:  # whole or absent
        tmp.write_text(json.dumps(res))
    return 0
