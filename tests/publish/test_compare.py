"""`lwq-gguf compare` on a tiny model: the three outputs, one row per file, cache reuse, bad input."""

import pytest
import json

from conftest import ROOT, error_line, run_cli
from lwq_gguf.score.scores import default_calibration

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
TEXT = WIKI if WIKI.is_file() else default_calibration()
ARGS = ("--baselines", "Q4_K_M,Q8_0", "--chunks", "2", "--ctx", "128", "--text", TEXT,
        "--calib-tokens", "256", "--ladder", "k")  # (K-quants: no i-quant grids to set up)


@pytest.mark.slow
def test_compare_outputs_and_cache(tiny, tmp_path):
    model, out = tiny("llama", 2), tmp_path / "cmp"
    p = run_cli("-q", "compare", model, "--avg-bits", "4.5", "-o", out, *ARGS, check=True)
    assert "4 file(s) built, 4 evaluated" in p.stdout
    doc = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in doc["rows"]] == ["F16", "Q4_K_M", "Q8_0", "lwq 4.5"]
    assert doc["chunks"] == 2 and doc["ctx"] == 128
    rows = {r["label"]: r for r in doc["rows"]}
    assert rows["F16"]["kld_mean"] == 0 and rows["F16"]["same_top_pct"] == 100
    assert abs(rows["lwq 4.5"]["bpw"] - 4.5) <= 0.02
    assert 0 < rows["Q8_0"]["kld_mean"] < rows["Q4_K_M"]["kld_mean"]
    for r in doc["rows"]:
        assert (out / r["file"]).is_file() and r["tokens_scored"] == 2 * 63
    md = (out / "compare.md").read_text()
    assert md.count("\n| ") == 1 + 4 and "compare.png" in md
    import matplotlib.image

    assert matplotlib.image.imread(out / "compare.png").shape[0] > 200

    # one more target: only that file is built and evaluated, the rest comes from the cache
    p = run_cli("-q", "compare", model, "--avg-bits", "4.5", "6", "-o", out, *ARGS, check=True)
    assert "1 file(s) built, 1 evaluated, 4 from cache" in p.stdout
    doc2 = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in doc2["rows"] if not r["cached"]] == ["lwq 6"]
    assert doc2["rows"][:4] == [dict(r, cached=True) for r in doc["rows"]]

    # --rescore: the scores are measured again and the layer-wise file rebuilt, the mixes stay;
    # malformed evaluation entries (valid JSON of the wrong shape) are measured again (all of
    # them: which entry sorts first depends on the text and the code's digest)
    before = (out / "scores.json").stat().st_mtime_ns
    for entry in (out / ".cache" / "eval").glob("*.json"):
        entry.write_text("[1, 2]")
    p = run_cli("-q", "compare", model, "--avg-bits", "4.5", "-o", out, *ARGS, "--rescore",
                check=True)
    assert "1 file(s) built, 4 evaluated" in p.stdout and "Traceback" not in p.stderr
    assert (out / "scores.json").stat().st_mtime_ns != before


def test_compare_bad_input(tiny, tmp_path):
    model = tiny("llama", 2)
    line = error_line(run_cli("compare", model, "--avg-bits", "4", "-o", "/proc/cmp", *ARGS))
    assert "/proc/cmp" in line and "-o" in line
    line = error_line(run_cli("compare", model, "--avg-bits", "4", "-o", tmp_path / "no" / "x", *ARGS))
    assert "does not exist" in line
    line = error_line(run_cli("compare", model, "-o", tmp_path / "b", *ARGS, "--baselines", "Q3_K_X"))
    assert "Q3_K_X" in line
    line = error_line(run_cli("compare", model, "-o", tmp_path / "b", *ARGS, "--baselines", "IQ2_XS",
                              "--imatrix", "none"))
    assert "--imatrix" in line
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    line = error_line(run_cli("compare", model, "--avg-bits", "4", "-o", tmp_path / "c",
                              "--baselines", "none", "--text", short))
    assert "too short" in line and not list((tmp_path / "c").glob("*.json"))
