"""The model card of a family: front matter from the source folder, numbers from compare.json."""

import json
import re

import pytest
import yaml

from conftest import error_line, run_cli
from lwq_gguf.publish.card import source_meta


def test_source_meta_takes_what_the_folder_states(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "org/Base-7B"}))
    assert source_meta(tmp_path) == {"base_model": "org/Base-7B"}
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n"
                                        "base_model: org/Other\n---\n# text\n")
    assert source_meta(tmp_path) == {"license": "apache-2.0", "language": ["en"],
                                     "base_model": "org/Other"}
    (tmp_path / "README.md").write_text("no front matter")
    (tmp_path / "config.json").write_text("{}")
    assert source_meta(tmp_path) == {"base_model": tmp_path.name}


@pytest.mark.slow
def test_family_card_numbers_are_compare_json(tiny, tmp_path):
    from conftest import ROOT
    from lwq_gguf.score.scores import default_calibration

    wiki = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    text = wiki if wiki.is_file() else default_calibration()
    model, out = tiny("llama", 2), tmp_path / "fam"
    (model / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n")
    try:
        p = run_cli("-q", "convert", model, "--avg-bits", "3.5", "5", "-o", out, "--ladder", "k",
                    "--calib-tokens", "256", "--eval", text, "--chunks", "2", "--ctx", "128",
                    "--baselines", "Q4_K_M", check=True)
    finally:
        (model / "README.md").unlink()
    assert "(the model card)" in p.stdout
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "mit" and front["language"] == "en" and "gguf" in front["tags"]
    assert front["base_model"] == model.name and front["pipeline_tag"] == "text-generation"
    doc = json.loads((tmp_path / "fam-eval" / "compare.json").read_text())
    measured = {r["label"]: r for r in doc["rows"] if r["kind"] != "base"}
    assert set(measured) == {"Q4_K_M", "lwq 3.5bpw", "lwq 5bpw"}
    for label, r in measured.items():
        name = (f"**{model.name}-lwq-{label[4:]}.gguf**" if label.startswith("lwq")
                else f"llama.cpp {label}")
        row = next(ln for ln in card.splitlines() if ln.startswith(f"| {name} |"))
        kld = re.search(r"\| ([0-9.]+) ± ([0-9.]+) \|", row)
        assert kld and float(kld.group(1)) == round(r["kld_mean"], 5), (row, r)
        assert f"{r['same_top_pct']:.2f}%" in row and f"{r['ppl']:.3f}" in row
    for f in ("kld-vs-size.png", "types-3.5bpw.png", "types-5bpw.png"):
        assert (out / f).stat().st_size > 1000
    assert "## How it was made" in card and "llama-cli -m" in card and "sha256" in card
    # again without --force: the files and the card are refused before any work
    line = error_line(run_cli("convert", model, "--avg-bits", "3.5", "5", "-o", out))
    assert "already exists" in line
    line = error_line(run_cli("convert", model, "--avg-bits", "3.5", "--card", "-o",
                              tmp_path / "one.gguf"))
    assert "FOLDER/" in line
