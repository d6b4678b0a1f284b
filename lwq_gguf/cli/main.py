"""The entry point and the error contract (one line per user error, never a traceback)."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from lwq_gguf.cli.commands import (cmd_compare, cmd_convert, cmd_eval, cmd_inspect, cmd_plan,
                                   cmd_score)
from lwq_gguf.cli.parser import EX_BUG, build_parser
from lwq_gguf.errors import LwqError
from lwq_gguf.process import run_process
from lwq_gguf.quant.rebuilt import wanted

# ---- the error contract ------------------------------------------------------------------------

def _os_error_line(e: OSError) -> str:
    """One line for an OSError that escaped the stages: disk full only for a disk-full cause."""
    from lwq_gguf.files import disk_full, is_disk_full

    where = Path(e.filename) if e.filename else Path("a file")
    if is_disk_full(e):
        return str(disk_full(where, e))
    return f"{where}: {e.strerror or e}: check the path, its permissions and the disk"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    a.argv = [str(x) for x in argv]
    debug = a.debug or os.environ.get("LWQ_DEBUG") == "1"
    try:
        wanted()  # (a bad LWQ_QUANTIZERS is refused before any work)
        {"score": cmd_score, "plan": cmd_plan, "convert": cmd_convert,
         "eval": cmd_eval, "compare": cmd_compare, "inspect": cmd_inspect}[a.command](a)
    except LwqError as e:
        print(f"lwq-gguf: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lwq-gguf: interrupted; no partial file was left (files already finished stay)",
              file=sys.stderr)
        return 130
    except OSError as e:
        if debug:
            traceback.print_exc()
        print(f"lwq-gguf: error: {_os_error_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            traceback.print_exc()
        hint = "" if debug else "; run again with --debug (or LWQ_DEBUG=1) for the traceback"
        print(f"lwq-gguf: internal error (a bug in lwq-gguf, not in your input): "
              f"{type(e).__name__}: {str(e)[:200]}{hint}; please report it", file=sys.stderr)
        return EX_BUG
    return 0


def run() -> int:
    """The ``lwq-gguf`` command: :func:`main` as a whole process (lwq_gguf.process)."""
    return run_process(main)
