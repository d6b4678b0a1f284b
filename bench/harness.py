"""What every bench script shares: paths, its argument parser, one child-process timer and the
results files (JSON + Markdown, with date, machine and command).

Bench scripts run as ``.venv/bin/python bench/NAME.py ...``: they import ``lwq_gguf`` as
installed (``make setup`` installs it editable) and this module from beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lwq_gguf.files import atomic_write_text
from lwq_gguf.report import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# WikiText-2 test from ../shared (the project's evaluation text); None where it is not there
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
WIKI_OR_NONE = WIKI if WIKI.is_file() else None


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose description is the first paragraph of the script's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def command() -> str:
    """The command line this run was started with, as ``bench/NAME.py ARGS``."""
    return " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def commit() -> str:
    """The code measured: HEAD, marked when the package's tracked files differ from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "lwq_gguf"],
                           capture_output=True, text=True).stdout.strip()
    return head + ("+changes" if dirty else "")


def run_child(cmd: list, env: dict | None = None, who: str = "bench",
              output: bool = False) -> dict:
    """Run one child process to its end: wall seconds and peak RSS (GiB, the child's and the
    children it waited for, from wait4, as GNU time reports it), and with ``output``
    its stdout and stderr together. A failure stops the bench with the output's tail."""
    cmd = [str(c) for c in cmd]
    t0 = time.time()
    p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"{who}: {' '.join(cmd[:4])} ... failed (exit {p.returncode}):\n"
                         f"{out[-5000:]}")
    r = {"seconds": round(wall, 1), "peak_rss_gb": round(ru.ru_maxrss / 2**20, 2)}
    return {**r, "output": out} if output else r


def write_results(path: Path, doc: dict, title: str, body: str) -> None:
    """``path`` (.json): ``doc`` after the date, machine and command (a key ``doc`` gives wins);
    beside it ``path`` .md: the title, command, machine and date, then ``body`` (Markdown).
    Both are written whole (a reader never sees half a file)."""
    doc = {"date": today(), "machine": machine(), "command": command(), **doc}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1))
    atomic_write_text(path.with_suffix(".md"),
                      f"# {title}\n\nCommand: `{doc['command']}`\n\nMachine: {doc['machine']}; "
                      f"{doc['date']}\n\n{body.rstrip()}\n")
    print(f"wrote {path} and {path.with_suffix('.md')}")
