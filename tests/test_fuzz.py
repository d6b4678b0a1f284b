"""Fuzz: truncated and garbled safetensors headers, index files, GGUF files, scores and plans.

Every reader must end in one of our errors (LwqError: one clear line at the CLI) or accept the
input; never another exception, a hang, or a crash of the process (llama.cpp aborts included);
and an input known to be corrupt (a truncation, JSON of the wrong shape) must be refused.
Mutations are seeded, so a failure reproduces.
"""

import json
import random
import shutil
import signal
import struct
from contextlib import contextmanager

import pytest
from gguf import GGUFReader

from conftest import error_line, run_cli
from lwq_gguf.errors import LwqError
from lwq_gguf.model.inventory import write_16bit
from lwq_gguf.quant.imatrix import read_imatrix
from lwq_gguf.llamacpp import find_llama_cpp
from lwq_gguf.model.load import open_model
from lwq_gguf.plan.plan import Plan, PlanConfig
from lwq_gguf.model.inventory import GGUFTensor
from lwq_gguf.score.scores import Scores, default_calibration
from lwq_gguf.quant.gguf_file import read_back

N = 40  # mutants per file kind


@contextmanager
def deadline(seconds=30):
    def hang(*_):
        raise TimeoutError(f"no answer in {seconds} s: a reader hangs")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def mutants(data: bytes, seed: int, n: int = N, head: int | None = None):
    """Truncations, byte flips and overwritten 64-bit counts/lengths, mostly in the header."""
    rng = random.Random(seed)
    head = min(len(data), head or 1 << 16)
    for i in range(n):
        b = bytearray(data)
        kind = i % 4
        if kind == 0:
            b = b[: rng.randrange(0, head)]
        elif kind == 1:
            for _ in range(rng.randrange(1, 9)):
                b[rng.randrange(0, head)] = rng.randrange(256)
        elif kind == 2:
            p = rng.randrange(0, head - 8)
            b[p: p + 8] = struct.pack("<Q", rng.choice([0, 1, 2**31, 2**32 - 1, 2**62, 2**64 - 1]))
        else:
            b = b[: rng.randrange(head, len(data))] if len(data) > head else b[:-1]
        yield i, bytes(b)


def only_our_errors(fn, *args, reject: bool = False):
    """fn(*args) either works or raises LwqError (one line); anything else fails the test.
    ``reject``: the input is known to be corrupt (a truncation), so it must be refused."""
    with deadline():
        try:
            fn(*args)
        except LwqError as e:
            assert str(e) and "\n" not in str(e)
            return
    assert not reject, f"{fn.__name__} accepted a corrupted input"


def truncated(i: int, b: bytes, data: bytes, padding: int = 0) -> bool:
    """Mutants 0 and 3 (mod 4) are truncations: corrupt unless they cut only the ``padding``
    bytes a GGUF may end with (the last tensor's alignment)."""
    return i % 4 in (0, 3) and len(b) < len(data) - padding


@pytest.fixture(scope="module")
def small_gguf(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-gguf")
    path = d / "tiny-f16.gguf"
    write_16bit(find_llama_cpp(), tiny("llama", 1, tied=True), path, "f16")
    return path


def synthetic_gguf(path):
    """A small GGUF with every part a reader parses: KV scalars, strings, a string array,
    tensors of two types (and a 300-token vocabulary, so parsing stays fast)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch="llama", use_temp_file=False)
    w.add_uint32("llama.block_count", 1)
    w.add_string("general.name", "fuzz")
    w.add_string("lwq.plan", '{"x": 1}')
    w.add_token_list([f"tok{i}" for i in range(300)])
    w.add_array("imatrix.datasets", ["calib.txt"])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((300, 64)).astype(np.float16))
    w.add_tensor("blk.0.ffn_up.weight.in_sum2", rng.random((1, 64)).astype(np.float32))
    w.add_tensor("blk.0.ffn_up.weight.counts", np.array([[8.0]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_readers_on_garbled_files(tmp_path):
    data = synthetic_gguf(tmp_path / "ok.gguf").read_bytes()
    assert {k: v.tolist() for k, v in read_imatrix(tmp_path / "ok.gguf").counts.items()} == {
        "blk.0.ffn_up.weight": [8.0]}
    info, ref = read_back(tmp_path / "ok.gguf"), GGUFReader(str(tmp_path / "ok.gguf"))
    assert info.types == {t.name: t.tensor_type.name.lower() for t in ref.tensors}
    assert info.nbytes == sum(int(t.n_bytes) for t in ref.tensors) == 300 * 64 * 2 + 64 * 4 + 4
    assert info.metadata == {"general.architecture": "llama", "general.name": "fuzz",
                             "lwq.plan": '{"x": 1}'}
    f = tmp_path / "x.gguf"
    for i, b in mutants(data, seed=1, n=4 * N, head=len(data) - 1000):
        f.write_bytes(b)
        only_our_errors(read_back, f, reject=truncated(i, b, data, padding=32))
        only_our_errors(read_imatrix, f, reject=truncated(i, b, data, padding=32))


def test_safetensors_and_index_on_garbled_files(tiny, tmp_path):
    src = tiny("llama", 1, shards=2)
    model = tmp_path / "m"
    shutil.copytree(src, model)
    shard = sorted(model.glob("model-*.safetensors"))[0]
    original = shard.read_bytes()
    for i, b in mutants(original, seed=2, head=struct.unpack("<Q", original[:8])[0] + 8):
        shard.write_bytes(b)
        only_our_errors(open_model, model, reject=truncated(i, b, original))
    shard.write_bytes(original)
    index = model / "model.safetensors.index.json"
    text = index.read_bytes()
    for i, b in mutants(text, seed=3, head=len(text)):
        index.write_bytes(b)
        only_our_errors(open_model, model, reject=i % 4 == 0)  # cut JSON is never valid
    for wrong in ("[1, 2]", '{"weight_map": [1]}', '{"weight_map": {"a": 3}}', "null"):
        index.write_text(wrong)  # valid JSON of the wrong shape
        only_our_errors(open_model, model, reject=True)


def test_scores_and_plan_json_garbled(tmp_path):
    scores = Scores("LlamaForCausalLM", 2, (0.1, 0.2), (0.3, 0.4), "c.txt", "0" * 64, 100, "cpu",
                    "1" * 64)
    assert Scores.from_json(scores.to_json()) == scores
    for i, b in mutants(scores.to_json().encode(), seed=4, head=10_000):
        only_our_errors(Scores.from_json, b.decode("utf-8", "replace"), "s.json",
                        reject=i % 4 == 0)
    good = json.loads(scores.to_json())
    for wrong in ("[1, 2]", "null", '"x"', json.dumps({**good, "lim": [0.1]}),
                  json.dumps({**good, "lim": ["a", "b"]}), json.dumps({**good, "sensitivity": [1]}),
                  json.dumps({**good, "imatrix": {"entries": [1]}})):
        only_our_errors(Scores.from_json, wrong, "s.json", reject=True)
    tensors = (GGUFTensor("token_embd.weight", (256, 1000), "f16"),
               GGUFTensor("blk.0.attn_q.weight", (256, 256), "f16"))
    plan = Plan(PlanConfig(avg_bits=4.0), tensors, ("q6_k", "q4_k"), (0,),
                ("q4_k", "q5_k")).to_json()
    assert Plan.from_json(plan).types == ("q6_k", "q4_k")
    for i, b in mutants(plan.encode(), seed=5, head=10_000):
        only_our_errors(Plan.from_json, b.decode("utf-8", "replace"), "p.json", reject=i % 4 == 0)
    good = json.loads(plan)
    for wrong in ("[1, 2]", "null", json.dumps({**good, "config": [1]}),
                  json.dumps({**good, "tensors": [{"name": 1}]}), json.dumps({**good, "tensors": []})):
        only_our_errors(Plan.from_json, wrong, "p.json", reject=True)


def test_eval_on_a_gguf_llama_cpp_aborts_on(small_gguf, tmp_path):
    r = GGUFReader(str(small_gguf))
    field = r.fields["tokenizer.ggml.tokens"]
    toks = [bytes(field.parts[i]) for i in field.data]
    a, b = next((x, y) for x, y in zip(toks[1000:], toks[1001:]) if len(x) == len(y) and x != y)
    data = small_gguf.read_bytes()
    at = data.index(struct.pack("<Q", len(a)) + a)
    bad = tmp_path / "dup-vocab.gguf"
    bad.write_bytes(data[: at + 8] + b + data[at + 8 + len(b):])
    text = default_calibration()
    line = error_line(run_cli("eval", bad, "--text", text, "--chunks", "2"))
    assert "dup-vocab.gguf" in line and "GGML_ASSERT" in line and "re-create" in line
    line = error_line(run_cli("eval", small_gguf, "--base", bad, "--text", text, "--chunks", "2"))
    assert "dup-vocab.gguf" in line
