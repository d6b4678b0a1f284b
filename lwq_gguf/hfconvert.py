"""llama.cpp's own HF -> GGUF converter (the pinned convert_hf_to_gguf.py), run in a subprocess.

Two modes, both in a child process so the converter's module state and memory never leak into
lwq-gguf:

* ``inventory MODEL OUT.json`` - the exact GGUF tensor list (name, ggml shape, type) the converter
  would write, computed lazily without writing anything;
* ``write MODEL OUT.gguf --outtype T --kv KV.json`` - the 16-bit GGUF, with extra metadata
  key/values (lwq.*) added so that llama-quantize carries them into the final file;
* ``write ... --types TYPES.json --ftype N [--imatrix F]`` - single pass: the planned GGUF itself,
  each tensor quantized by the pinned ggml as the writer reaches it (:mod:`lwq_gguf.onepass`).

The parent calls :func:`converter_inventory` and :func:`converter_write`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lwq_gguf.errors import LwqError, ToolError
from lwq_gguf.llamacpp import LlamaCpp, run_tool


ERROR_MARK = "lwq-error: "  # a user error found in the child, passed on as one line


def _model_instance(src: Path, model_dir: Path, outtype: str, out: Path):
    sys.path.insert(0, str(src))
    import logging

    import gguf
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ftypes = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "auto": gguf.LlamaFileType.GUESSED}
    hparams = ModelBase.load_hparams(model_dir, False)
    cls = get_model_class(get_model_architecture(hparams, ModelType.TEXT), mmproj=False)
    return cls(model_dir, ftypes[outtype], out)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m lwq_gguf.hfconvert")
    ap.add_argument("mode", choices=["inventory", "write"])
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--outtype", default="auto")
    ap.add_argument("--kv", type=Path)
    ap.add_argument("--types", type=Path)
    ap.add_argument("--ftype", type=int, default=0)
    ap.add_argument("--imatrix", type=Path)
    ap.add_argument("--imatrix-name")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--encoder", default="ggml")
    a = ap.parse_args(argv)

    import torch

    with torch.inference_mode():
        inst = _model_instance(a.src, a.model, a.outtype, a.out)
        if a.mode == "inventory":
            inst.prepare_tensors()
            rows = [{"name": name, "shape": [int(d) for d in reversed(ti.shape)],
                     "type": ti.dtype.name.lower()}
                    for shard in inst.gguf_writer.tensors for name, ti in shard.items()]
            a.out.write_text(json.dumps(rows))
            return 0
        kv = json.loads(a.kv.read_text()) if a.kv else {}
        w = inst.gguf_writer
        for key, value in kv.items():
            if isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
            else:
                w.add_uint32(key, int(value))
        if a.types is None:
            inst.write()
            return 0
        from lwq_gguf.onepass import requantize_writer

        inst.prepare_tensors()
        inst.prepare_metadata(vocab_only=False)
        try:
            pool, ahead = requantize_writer(w, json.loads(a.types.read_text()), a.ftype, a.imatrix,
                                     a.imatrix_name, a.threads, a.encoder,
                                     lambda name: print(f"lwq-written {name}", flush=True))
            with pool, ahead:
                w.write_header_to_file(path=a.out)
                w.write_kv_data_to_file()
                w.write_tensors_to_file(progress=False)
                w.close()
        except LwqError as e:
            print(f"{ERROR_MARK}{e}", flush=True)
            return 3
    return 0


def _cmd(lc: LlamaCpp, mode: str, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lwq_gguf.hfconvert", mode, "--src", str(lc.src),
            str(model), str(out), *extra]


def converter_inventory(lc: LlamaCpp, model: Path, out_json: Path) -> list[dict]:
    """The GGUF tensor list of ``model`` as the converter would write it (nothing written)."""
    run_tool(_cmd(lc, "inventory", model, out_json), what=f"convert_hf_to_gguf on {model}")
    return json.loads(out_json.read_text())


def converter_write(lc: LlamaCpp, model: Path, out: Path, outtype: str, kv_json: Path,
                    on_line=None, *extra: str) -> None:
    """Write the GGUF of ``model`` with the extra metadata in ``kv_json``: 16-bit, or with
    ``extra`` = ``--types ...`` the planned file in one pass. A user error the child finds (a
    NaN weight) is raised here as that one line."""
    lines: list[str] = []

    def seen(line: str) -> None:
        if line.startswith(ERROR_MARK):
            lines.append(line[len(ERROR_MARK):])
        if on_line:
            on_line(line)

    try:
        run_tool(_cmd(lc, "write", model, out, "--outtype", outtype, "--kv", str(kv_json), *extra),
                 what=f"convert_hf_to_gguf on {model}", on_line=seen)
    except ToolError:
        if lines:
            raise LwqError(lines[-1]) from None
        raise


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
