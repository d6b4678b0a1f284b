"""--imatrix as one value: parsed and read once, handed down, and the one file llama.cpp reads."""

import numpy as np
import pytest

from lwq_gguf.errors import LwqError
from lwq_gguf.quant.imatrix import (Imatrix, ImatrixChoice, imatrix_to_dict, read_imatrix,
                                    write_imatrix)


def _imatrix() -> Imatrix:
    rng = np.random.default_rng(0)
    return Imatrix({"blk.0.attn_q.weight": rng.uniform(1, 2, 64)},
                   {"blk.0.attn_q.weight": np.array([7])}, "calib.txt", 512, 7)


def test_a_file_is_read_once_and_handed_down(tmp_path):
    f = tmp_path / "a.imatrix.gguf"
    write_imatrix(_imatrix(), f)
    choice = ImatrixChoice.parse(str(f))
    assert choice.mode == "file" and choice.used and choice.key.startswith("file:")
    f.unlink()  # what is handed down is the parsed value, not the path read again
    got = choice.given()[choice.key]
    want = _imatrix()
    assert np.allclose(got.weights("blk.0.attn_q.weight"), want.weights("blk.0.attn_q.weight"))
    assert choice.file_for_llama(None, tmp_path / "x.gguf") == f  # (children get the path)
    assert choice == ImatrixChoice(mode="file", path=f, sha256=choice.sha256)  # data not compared


def test_auto_and_none(tmp_path):
    auto, none = ImatrixChoice.parse("auto"), ImatrixChoice.parse(None)
    assert auto.used and not none.used and auto.given() == {} == none.given()
    path = auto.file_for_llama(imatrix_to_dict(_imatrix()), tmp_path / "imatrix.gguf")
    assert read_imatrix(path).chunks == 7
    assert none.file_for_llama(None, tmp_path / "n.gguf") is None
    assert not (tmp_path / "n.gguf").exists()


def test_bad_files_are_refused_at_parse(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    for spec in (bad, tmp_path / "missing.gguf"):
        with pytest.raises(LwqError, match=str(spec.name)):
            ImatrixChoice.parse(str(spec))
