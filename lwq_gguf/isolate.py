"""A torch-free child process for llama.cpp calls (see lwq_gguf.evaluate's docstring).

    python -m lwq_gguf.isolate < spec.json

reads {"call": "check_text" | "evaluate_many", "lc": llama.cpp folder, "out": result path,
"args": {...}}, runs the call with LWQ_EVAL_CHILD=1 (numpy arithmetic, no further isolation)
and writes {"ok": result} or {"error": message} to ``out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lwq_gguf.errors import LwqError
from lwq_gguf.llamacpp import LlamaCpp


def in_child() -> bool:
    return os.environ.get("LWQ_EVAL_CHILD") == "1"


def isolated(lc: LlamaCpp) -> bool:
    """True when llama.cpp must run in a torch-free child (a CUDA build; or asked for)."""
    return not in_child() and (lc.has_cuda or os.environ.get("LWQ_EVAL_ISOLATE") == "1")


def run_child(lc: LlamaCpp, call: str, args: dict):
    """Run ``call`` (check_text | evaluate_many) in ``python -m lwq_gguf.isolate``."""
    with tempfile.TemporaryDirectory(prefix="lwq-eval-") as tmp:
        out = Path(tmp) / "result.json"
        spec = json.dumps({"call": call, "lc": str(lc.root), "out": str(out), "args": args})
        here = str(Path(__file__).resolve().parents[1])  # lwq_gguf importable however we run
        env = dict(os.environ, LWQ_EVAL_CHILD="1", LLAMA_CPP_LIB_PATH=str(lc.bin),
                   PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
        p = subprocess.run([sys.executable, "-m", "lwq_gguf.isolate"], input=spec, text=True,
                           env=env)
        if out.is_file():
            res = json.loads(out.read_text())
            if "error" in res:
                raise LwqError(res["error"])
            return res["ok"]  # written last: complete even if the exit itself went wrong
    how = f"signal {-p.returncode}" if p.returncode < 0 else f"exit status {p.returncode}"
    raise LwqError(f"llama.cpp ({lc.root}) ended with {how} while evaluating in a child process: "
                   "check the GPU driver and the build, or use --device cpu")


def main() -> None:
    from lwq_gguf.evaluate import EvalConfig, check_text, evaluate_many

    spec = json.loads(sys.stdin.read())
    lc, a = LlamaCpp(Path(spec["lc"])), spec["args"]
    try:
        if spec["call"] == "check_text":
            res = {"ok": check_text(Path(a["gguf"]), Path(a["text"]), lc, a["ctx"])}
        else:
            base = Path(a["base"]) if a["base"] else None
            res = {"ok": [r.to_dict() for r in evaluate_many(
                [Path(q) for q in a["quants"]], Path(a["text"]), lc, EvalConfig(**a["cfg"]), base,
                a["progress"], budget=a["budget"])]}
    except LwqError as e:
        res = {"error": str(e)}
    except KeyboardInterrupt:  # the parent gets it too and says so
        sys.exit(130)
    part = Path(spec["out"] + ".part")
    part.write_text(json.dumps(res))
    os.replace(part, spec["out"])  # whole or absent


if __name__ == "__main__":
    main()
