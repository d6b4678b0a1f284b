"""Shared fixtures: tiny generated models, the demo models, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
SMOL = ROOT / "models" / "smollm2-135m"
K256 = ROOT / "models" / "smollm2-135m-k256"
MOE6 = ROOT / "models" / "smollm2-135m-moe6"
CONT = ROOT / "models" / "smollm2-135m-k256-cont"

from tiny import make_tiny  # noqa: E402


KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def follows_ranking(plan, scores) -> None:
    """For every tensor kind, layers with more bits never rank below layers with fewer."""
    from lwq_gguf.quant.types import QUANT_TYPES

    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    for kind in KINDS:
        bits = [QUANT_TYPES[plan.type_of(f"blk.{i}.{kind}.weight")].bpw for i in order]
        assert bits == sorted(bits, reverse=True), (kind, bits)


def run_cli(*args, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """``python -m lwq_gguf ARGS`` in a child process, as a user runs it."""
    env = dict(kw.pop("env", os.environ), PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "lwq_gguf", *map(str, args)], capture_output=True,
                       text=True, env=env, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"lwq-gguf {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def error_line(p: subprocess.CompletedProcess) -> str:
    """The one error line a user error must produce (and no traceback)."""
    assert p.returncode != 0, p.stdout
    assert "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("lwq-gguf: error:")]
    assert len(errors) == 1, p.stderr
    return errors[0]


@pytest.fixture(scope="session", autouse=True)
def score_cache(tmp_path_factory):
    """The tests' own score cache (never the user's ~/.cache/lwq-gguf/scores)."""
    path = tmp_path_factory.mktemp("score-cache")
    os.environ["LWQ_SCORES_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch, layers, dtype=..., shards=..., tied=...) -> folder of a cached random model."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", layers: int = 2, **kw) -> Path:
        key = (arch, layers, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = make_tiny(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, layers, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def moe_model():
    """The aligned demo model as a 6-expert MixtralForCausalLM (all experts active)."""
    if not (MOE6 / "model.safetensors").is_file():
        pytest.fail(f"{MOE6} missing: run `make models` first")
    return MOE6


@pytest.fixture(scope="session")
def cont_model():
    if not (CONT / "model.safetensors").is_file():
        pytest.fail(f"{CONT} missing: run `make models` first")
    return CONT


@pytest.fixture(scope="session")
def demo_models():
    for d in (SMOL, K256):
        if not (d / "model.safetensors").is_file():
            pytest.fail(f"{d} missing: run `make models` first")
    return SMOL, K256


GEMMA = ROOT / "models" / "gemma3-270m"


@pytest.fixture(scope="session")
def gemma_model():
    """The real trained model (Gemma 3 270M) and the packaged Q4_K_M GGUF it was rebuilt from."""
    src = ROOT / "models" / "gemma3-270m.Q4_K_M.gguf"
    if not (GEMMA / "model.safetensors").is_file() or not src.is_file():
        pytest.fail(f"{GEMMA} missing: run `make models` first")
    return GEMMA, src
