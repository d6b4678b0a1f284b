"""The score cache: keyed by model content, calibration text and settings; --rescore; atomic."""

import json
import os
import shutil

import pytest

from conftest import run_cli
from lwq_gguf.model.load import open_model
from lwq_gguf.score.scores import ScoreConfig
from lwq_gguf.files import code_digest
from lwq_gguf.score.cache import CODE, ScoreCache, model_sha256

REUSE = "scores: reusing"


@pytest.fixture()
def model(tiny, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny("llama", 2), d)
    return d


def plan(model, cache, *extra):
    env = dict(os.environ, LWQ_SCORES_CACHE=str(cache))
    return run_cli("plan", model, "--avg-bits", "4", "--strategy", "lim", "--imatrix", "none",
                   "--calib-tokens", "256", *extra, env=env, check=True)


@pytest.mark.slow
def test_plan_reuses_scores_until_model_or_settings_change(model, tmp_path):
    cache = tmp_path / "cache"
    first = plan(model, cache)
    assert REUSE not in first.stderr
    entries = sorted(cache.glob("*.json"))
    assert len(entries) == 1
    lim = json.loads(entries[0].read_text())["lim"]
    again = plan(model, cache)  # same model, text, settings: from the cache, same plan
    assert REUSE in again.stderr and again.stdout == first.stdout
    assert REUSE not in plan(model, cache, "--rescore").stderr
    assert len(list(cache.glob("*.json"))) == 1  # measured again, stored in the same entry

    shard = model / "model.safetensors"  # one weight byte changed, same size: a new model
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    assert REUSE not in plan(model, cache).stderr
    assert len(list(cache.glob("*.json"))) == 2
    # the converter's tensor list depends on the layout (config, names, dtypes, shapes), not on
    # the weight bytes: still one entry; a config change makes a second
    assert len(list(cache.glob("inventory/*.json"))) == 1
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "lwq_test_note": 1}))
    assert REUSE not in plan(model, cache).stderr
    assert len(list(cache.glob("inventory/*.json"))) == 2
    assert json.loads(entries[0].read_text())["lim"] == lim  # the old entry is untouched


@pytest.mark.slow
def test_a_corrupt_or_torn_entry_is_measured_again(model, tmp_path):
    cache = tmp_path / "cache"
    plan(model, cache)
    (entry,) = cache.glob("*.json")
    good = entry.read_text()
    entry.write_text(good[: len(good) // 2])  # as a torn write would leave it (never by us)
    p = plan(model, cache)
    assert REUSE not in p.stderr and "Traceback" not in p.stderr
    assert entry.read_text() == good  # replaced by a complete entry
    assert not list(cache.glob(".*.tmp"))
    for wrong in ("[1, 2]",):
        entry.write_text(wrong)  # valid JSON of the wrong shape: one bad entry breaks nothing
        p = plan(model, cache)
        assert REUSE not in p.stderr and "Traceback" not in p.stderr
        assert entry.read_text() == good
    (inv,) = cache.glob("inventory/*.json")
    rows = inv.read_text()
    inv.write_text('[{"name": 1}]')  # valid JSON, not an inventory: run the converter again
    assert REUSE in plan(model, cache).stderr and inv.read_text() == rows


def test_key_covers_calibration_text_settings_and_code(model, tmp_path, monkeypatch):
    monkeypatch.setenv("LWQ_SCORES_CACHE", str(tmp_path / "c"))
    m = open_model(model)
    digest = model_sha256(m)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    a = ScoreCache(m, digest, ScoreConfig(calib=text)).path
    text.write_text("A different calibration text entirely, with other words. " * 40)
    b = ScoreCache(m, digest, ScoreConfig(calib=text)).path
    assert a != b
    assert ScoreCache(m, digest, ScoreConfig(calib=text, device="cpu")).path == b
    assert ScoreCache(m, digest, ScoreConfig(calib=text, calib_tokens=128)).path != b
    assert ScoreCache(m, digest, ScoreConfig(calib=text, precision="fp32")).path != b
    # the code that measures is part of the key: a changed scoring module is a miss
    assert ScoreCache(m, digest, ScoreConfig(calib=text), code=code_digest(*CODE)).path == b
    assert ScoreCache(m, digest, ScoreConfig(calib=text), code="0" * 16).path != b


def test_an_entry_made_by_other_code_is_not_reused(model, tmp_path, monkeypatch):
    """A cache entry stored under another code digest (as after editing lwq_gguf/score/) is
    not found (so the scores are measured again)."""
    cache = tmp_path / "cache"
    plan(model, cache)
    (entry,) = cache.glob("*.json")
    monkeypatch.setenv("LWQ_SCORES_CACHE", str(cache))
    m = open_model(model)
    cfg = ScoreConfig(calib_tokens=256)
    here = ScoreCache(m, model_sha256(m), cfg)
    assert here.path == entry and here.load() is not None
    other = ScoreCache(m, model_sha256(m), cfg, code="f" * 16)
    assert other.path != entry and other.load() is None


@pytest.mark.slow
def test_sigkill_during_scoring_leaves_no_file_and_an_intact_cache(model, tmp_path):
    import signal
    import subprocess
    import sys
    import threading
    import time

    cache = tmp_path / "cache"
    env = dict(os.environ, LWQ_SCORES_CACHE=str(cache), PYTHONUNBUFFERED="1")
    out = tmp_path / "k.gguf"
    args = [sys.executable, "-m", "lwq_gguf", "convert", str(model), "--avg-bits", "4",
            "--calib-tokens", "512", "--no-verify", "-o", str(out), "--ladder", "k"]
    run_cli(*args[3:], env=env, check=True)
    (entry,) = cache.glob("*.json")
    good = entry.read_bytes()
    out.unlink()
    for phase in ("scoring (cpu): forward", "scoring (cpu): backward"):  # kill in each stage
        proc = subprocess.Popen([*args, "--rescore"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        seen = []
        reader = threading.Thread(target=lambda seen=seen, proc=proc: seen.extend(iter(lambda: proc.stderr.read(1)
                                                                   .decode("latin-1"), "")))
        reader.start()
        deadline = time.time() + 120
        while phase not in "".join(seen) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"convert ended before {phase!r}: {''.join(seen)[-500:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join()
        assert not out.exists()
        assert entry.read_bytes() == good and not list(cache.glob(".*.tmp"))
    again = run_cli(*args[3:6], "4.5", *args[7:], env=env, check=True)
    assert REUSE in again.stderr and out.exists()


def test_a_new_models_digest_is_read_beside_the_import_and_then_remembered(model, tmp_path,
                                                                          monkeypatch):
    from lwq_gguf.pipeline import _digest
    from lwq_gguf.score.cache import remembered

    monkeypatch.setenv("LWQ_SCORES_CACHE", str(tmp_path / "c"))
    m = open_model(model)
    assert not remembered(m)
    digest = _digest(m, warm=True)  # hashed on a thread while PyTorch imports
    assert remembered(m)
    assert digest == model_sha256(m) == _digest(m, warm=False)
    (model / "config.json").write_text((model / "config.json").read_text() + "\n")
    assert not remembered(m)  # a changed file is read again
    assert model_sha256(m) != digest
