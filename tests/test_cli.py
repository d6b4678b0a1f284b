"""Every bad input ends in one clear error line, a non-zero exit and no output file."""

import json
import resource
import shutil
import signal
import struct

import pytest
from safetensors.numpy import load_file, save_file

from conftest import error_line, run_cli


@pytest.fixture
def model(tiny, tmp_path):
    """A private copy of a 2-shard tiny Llama (with index) to damage."""
    dst = tmp_path / "model"
    shutil.copytree(tiny("llama", 2, shards=2), dst)
    return dst


def convert_fails(model, tmp_path, *extra, out_name="out.gguf"):
    out = tmp_path / out_name
    p = run_cli("-q", "convert", model, "--avg-bits", "4", "-o", out, "--no-verify", *extra)
    line = error_line(p)
    assert not out.exists()
    leftovers = [f.name for f in out.parent.iterdir() if f.name.startswith(f".{out_name}")]
    assert leftovers == []
    return line


def shards(model):
    return sorted(model.glob("model-*.safetensors"))


def test_not_a_folder(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert "not a folder" in convert_fails(f, tmp_path)


def test_no_config(model, tmp_path):
    (model / "config.json").unlink()
    assert "config.json: missing" in convert_fails(model, tmp_path)


def test_missing_shard_with_index(model, tmp_path):
    shards(model)[1].unlink()
    line = convert_fails(model, tmp_path)
    assert "model.safetensors.index.json: names missing shard model-00002-of-" in line


def test_missing_shard_without_index(model, tmp_path):
    (model / "model.safetensors.index.json").unlink()
    shards(model)[1].unlink()
    assert "no tensors for layer" in convert_fails(model, tmp_path)


def test_truncated_shard(model, tmp_path):
    f = shards(model)[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    line = convert_fails(model, tmp_path)
    assert f.name in line and "truncated" in line


def test_corrupt_header(model, tmp_path):
    f = shards(model)[0]
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = b"#" * n
    f.write_bytes(bytes(data))
    line = convert_fails(model, tmp_path)
    assert f.name in line and "corrupt safetensors header" in line


def test_index_names_tensor_in_wrong_file(model, tmp_path):
    idx = model / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    name = next(iter(d["weight_map"]))
    other = [f for f in set(d["weight_map"].values()) if f != d["weight_map"][name]][0]
    d["weight_map"][name] = other
    idx.write_text(json.dumps(d))
    assert name in convert_fails(model, tmp_path)


def test_architecture_that_does_not_match_the_weights(model, tmp_path):
    """(An architecture the converter does not know at all: tests/test_architectures.py.)"""
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(cfg))
    line = convert_fails(model, tmp_path)
    assert "model.layers.0.mlp.gate_proj.weight is not a tensor of GPT2LMHeadModel" in line


def test_nan_in_a_weight(model, tmp_path):
    f = next(f for f in shards(model) if any(n.endswith("up_proj.weight") for n in load_file(f)))
    tensors = load_file(f)
    name = next(n for n in tensors if n.endswith("up_proj.weight"))
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = float("nan")
    save_file(tensors, f, metadata={"format": "pt"})
    line = convert_fails(model, tmp_path)
    assert name in line and "NaN/Inf" in line


def test_avg_bits_outside_reachable_range(model, tmp_path):
    line = convert_fails(model, tmp_path, "--avg-bits", "1.05")  # (Q1_0 alone is 1.125 BPW)
    assert "outside what ladder" in line and " to " in line


def test_ladder_presets_and_types_that_need_an_imatrix(model, tmp_path):
    from lwq_gguf.quant.types import K_LADDER

    out = tmp_path / "plan.json"
    run_cli("plan", model, "--avg-bits", "4", "--ladder", "k", "--calib-tokens", "64", "-q",
            "-o", out, check=True)
    planned = {t["type"] for t in json.loads(out.read_text())["tensors"]}
    # K-quants, or llama.cpp's fallbacks for rows they do not fit; never an i-quant
    assert planned <= set(K_LADDER) | {"q4_0", "q5_0", "q5_1", "f32"}, planned
    line = error_line(run_cli("plan", model, "--avg-bits", "2.2", "--ladder", "iq2_xxs,iq1_m",
                              "--imatrix", "none", "-q"))
    assert "--ladder iq1_m,iq2_xxs" in line and "needs an importance matrix" in line
    line = error_line(run_cli("plan", model, "--avg-bits", "3", "--ladder", "q2_k,iq2_xs",
                              "--strategy", "zd", "-q"))
    assert "iq2_xs need an importance matrix" in line and "--strategy auto" in line


def test_unknown_type_name(model, tmp_path):
    line = convert_fails(model, tmp_path, "--ladder", "q2_k,q4_kk")
    assert "unknown quantization type 'q4_kk'" in line
    line = convert_fails(model, tmp_path, "--tensor-type", "attn_v=q9")
    assert "unknown quantization type 'q9'" in line


def test_unwritable_output_folder(model, tmp_path):
    p = run_cli("-q", "convert", model, "--avg-bits", "4", "-o", "/proc/lwq-test.gguf")
    assert "not writable" in error_line(p)
    p = run_cli("-q", "convert", model, "--avg-bits", "4", "-o", tmp_path / "nope" / "x.gguf")
    assert "does not exist" in error_line(p)


def test_output_exists_without_force(model, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    p = run_cli("-q", "convert", model, "--avg-bits", "4", "-o", out)
    assert "already exists: pass --force" in error_line(p)
    assert out.read_bytes() == b"precious"


@pytest.mark.slow
def test_disk_full_while_writing(model, tmp_path):
    """A file-size limit makes every write past 512 KiB fail (EFBIG), as a full disk would."""
    out = tmp_path / "out.gguf"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 19, 1 << 19))  # (the file: ~1.1 MiB)

    p = run_cli("-q", "convert", model, "--avg-bits", "4", "-o", out, "--strategy", "lim",
                "--imatrix", "none", "--calib-tokens", "64", preexec_fn=limit)
    assert "disk full" in error_line(p)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model"]


# ---- the cases a new user ran into, and the rest of the error contract --------------------------

def test_missing_calibration_text_is_one_line(model, tmp_path):
    missing = tmp_path / "missing.txt"
    line = error_line(run_cli("plan", model, "--avg-bits", "3.5", "--calib", missing))
    assert str(missing) in line and "--calib" in line
    assert str(missing) in convert_fails(model, tmp_path, "--calib", missing)


def test_unreadable_calibration_text(model, tmp_path):
    folder = tmp_path / "a-folder.txt"
    folder.mkdir()  # not a readable file (as root, permission bits would not stop a read)
    assert str(folder) in convert_fails(model, tmp_path, "--calib", folder)


@pytest.mark.parametrize("text", ["[1, 2]", '{"format": "lwq-gguf.scores"}', "\xff\xfe"])
def test_scores_file_of_the_wrong_shape(model, tmp_path, text):
    bad = tmp_path / "s.json"
    bad.write_bytes(text.encode("latin-1"))
    line = error_line(run_cli("plan", model, "--avg-bits", "4", "--scores", bad))
    assert str(bad) in line and "lwq-gguf score" in line


@pytest.mark.parametrize("text", ["[1, 2]", '{"format": "lwq-gguf.plan", "version": 1}', "7"])
def test_plan_file_of_the_wrong_shape(model, tmp_path, text):
    bad = tmp_path / "p.json"
    bad.write_text(text)
    out = tmp_path / "o.gguf"
    line = error_line(run_cli("convert", model, "--plan", bad, "-o", out, "--no-verify"))
    assert str(bad) in line and "lwq-gguf plan" in line and not out.exists()


def test_scores_of_other_weights_are_refused(model, tmp_path):
    scores = tmp_path / "s.json"
    run_cli("-q", "score", model, "-o", scores, "--no-sensitivity", "--calib-tokens", "64",
            check=True)
    shard = shards(model)[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # same architecture and depth, other weights
    shard.write_bytes(bytes(data))
    line = error_line(run_cli("plan", model, "--avg-bits", "4", "--strategy", "lim",
                              "--scores", scores))
    assert "other weights" in line and "lwq-gguf score" in line


def test_quiet_and_debug_after_the_subcommand(model):
    p = run_cli("plan", model, "--avg-bits", "4", "--strategy", "lim", "--imatrix", "none",
                "--calib-tokens", "64", "-q", check=True)
    assert "LIM (" not in p.stderr and "lim" in p.stdout.lower()
    p = run_cli("plan", "-q", "--debug", model, "--avg-bits", "25")
    assert "outside what ladder" in error_line(p)


def test_more_than_one_target_outside_compare(model):
    line = error_line(run_cli("plan", model, "--avg-bits", "3", "4"))
    assert "one target" in line and "family" in line and "compare" in line


def test_an_internal_error_is_one_line_and_a_traceback_only_with_debug(model, monkeypatch,
                                                                      capsys):
    """A bug (here: a stage made to raise) is one line that says so; --debug shows where."""
    import lwq_gguf.publish.outputs
    from lwq_gguf.cli.main import EX_BUG, main

    def broken(*_a, **_k):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(lwq_gguf.publish.outputs, "prepare", broken)
    args = ["plan", str(model), "--avg-bits", "4", "--strategy", "lim"]
    assert main(args) == EX_BUG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" in err and "--debug" in err
    assert "Traceback" not in err
    assert main(args + ["--debug"]) == EX_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "injected fault" in err
    monkeypatch.setenv("LWQ_DEBUG", "1")
    assert main(args) == EX_BUG and "Traceback" in capsys.readouterr().err


def test_an_os_error_that_is_not_a_full_disk_is_not_called_one(monkeypatch, capsys, model):
    import errno

    import lwq_gguf.publish.outputs
    from lwq_gguf.cli.main import main

    def denied(*_a, **_k):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/file")

    monkeypatch.setattr(lwq_gguf.publish.outputs, "prepare", denied)
    assert main(["plan", str(model), "--avg-bits", "4"]) == 2
    err = capsys.readouterr().err
    assert "/some/file" in err and "Permission denied" in err and "disk full" not in err
