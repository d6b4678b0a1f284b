"""The bench harness: every bench script goes through it (no path hacks), its child timer measures
what the child used, and its results files carry date, machine and command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "harness.py")


def _harness():
    sys.path.insert(0, str(BENCH))
    try:
        import harness
    finally:
        sys.path.remove(str(BENCH))
    return harness


def test_bench_scripts_import_the_package_normally():
    bad = [f"{p.name}: {m.group(0)}" for p in [*SCRIPTS, BENCH / "harness.py"]
           for m in re.finditer(r"sys\.path\.(insert|append)|noqa: E402|/usr/bin/time -v",
                                p.read_text())]
    assert not bad, bad
    uses = [p.name for p in SCRIPTS if "from harness import" not in p.read_text()]
    assert not uses, f"bench scripts not on the harness: {uses}"


@pytest.mark.parametrize("script", [p for p in SCRIPTS if "ArgumentParser" not in p.read_text()
                                    and "parser(__doc__)" in p.read_text()],
                         ids=lambda p: p.name)
def test_bench_script_starts(script):
    """Each script's imports resolve and its arguments parse (``--help`` runs nothing else)."""
    p = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "usage:" in p.stdout


def test_run_child_measures_the_child_and_stops_on_failure():
    h = _harness()
    r = h.run_child([sys.executable, "-c", "x = bytearray(300 * 2**20); print('ok')"],
                    output=True)
    assert r["output"].strip() == "ok"
    assert 0.28 <= r["peak_rss_gb"] < 2, r  # the child's 300 MiB, not this process's
    assert r["seconds"] >= 0
    assert "output" not in h.run_child([sys.executable, "-c", "pass"])
    with pytest.raises(SystemExit, match=r"failed \(exit 3\)"):
        h.run_child([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])


def test_write_results_writes_json_and_markdown_with_provenance(tmp_path):
    h = _harness()
    out = tmp_path / "r" / "x.json"
    h.write_results(out, {"rows": [1, 2], "date": "2026-01-02"}, "Title", "| a |\n|---|\n| 1 |")
    doc = json.loads(out.read_text())
    assert doc["rows"] == [1, 2] and doc["date"] == "2026-01-02"  # a key the doc gives wins
    assert doc["machine"] and doc["command"].startswith("bench/")
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# Title\n") and doc["machine"] in md and "| 1 |" in md
    assert not list(out.parent.glob("*.tmp*")) and not list(out.parent.glob(".*"))
