"""Write: plan -> GGUF, with llama.cpp's own converter and quantizer from the pin.

Single pass (the default): the pinned ``convert_hf_to_gguf`` prepares its tensors and metadata
(``--outtype``, default auto: bf16 for a bf16 checkpoint, else f16, is the precision it hands on)
and each tensor is quantized to its planned type by the pinned ggml as it is written
(:mod:`lwq_gguf.write.onepass`), byte-identical to the two-step file. Extra disk: none beyond the output.

Two steps (``--two-step``): the converter writes the 16-bit GGUF with the lwq.* metadata, then
``llama-quantize --tensor-type-file`` gives every quantizable tensor its planned type (one exact
pattern per tensor, so llama.cpp's own mix logic never decides). Extra disk: the 16-bit GGUF
(2 bytes per weight) beside the output.

Work files and the result live beside the target (``.NAME.lwq-work/`` and ``.NAME.partial``); the
result is renamed onto the target only after the built-in check passes, so an interrupted or
failed run leaves nothing at the target path.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import gguf
from tqdm import tqdm

from lwq_gguf.errors import OutputError, PlanError
from lwq_gguf.files import Reads, disk_full, is_disk_full, partial_path
from lwq_gguf.llamacpp import LlamaCpp, run_tool
from lwq_gguf.model.inventory import (WRITTEN_MARK, ConverterJob, run_job,
                                      write_16bit)
from lwq_gguf.plan.plan import Plan
from lwq_gguf.plan.size import lwq_metadata
from lwq_gguf.quant.types import QUANT_TYPES, file_type_for
from lwq_gguf.write import onepass
from lwq_gguf.write.onepass import QuantizeSettings


@dataclass(frozen=True, kw_only=True)
class WriteConfig:
    output: Path
    imatrix: Path | None = None
    outtype: str = "auto"  # auto | f16 | bf16 | f32: what the converter hands the quantizer
    force: bool = False
    threads: int = 0  # 0: all cores
    two_step: bool = False  # converter -> 16-bit GGUF -> llama-quantize (instead of one pass)
    reads: Reads = field(default_factory=Reads)  # what the output may not replace (files.Reads)


def work_paths(output: Path) -> tuple[Path, Path]:
    """(.NAME.lwq-work folder, .NAME.partial file) beside the target."""
    return output.parent / f".{output.name}.lwq-work", partial_path(output)


def guard_dir(output: Path) -> Path:
    """The folder beside the target where a llama.cpp mix is written and measured against the
    plan (lwq_gguf.plan.guard)."""
    return output.parent / f".{output.name}.lwq-guard"


def check_imatrix(imatrix: Path | None, plan: Plan) -> None:
    if imatrix is not None and not imatrix.is_file():
        raise OutputError(f"{imatrix}: imatrix file not found: make one with llama-imatrix")
    needy = sorted({t for t in plan.types if t in QUANT_TYPES and QUANT_TYPES[t].needs_imatrix})
    if needy and imatrix is None:
        raise PlanError(f"types {', '.join(needy)} need an importance matrix: pass --imatrix FILE "
                        "or drop them from the ladder")


def check_free_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutputError(f"{folder}: not enough free disk space: need {need / 2**20:.0f} MiB "
                          f"(output, and the 16-bit intermediate with --two-step), have "
                          f"{free / 2**20:.0f} MiB: free space or write elsewhere")


def _file_type(plan: Plan) -> int:
    """general.file_type: a preset's own (plan.mix), else the type most weights have."""
    if plan.mix:
        return int(gguf.LlamaFileType[f"MOSTLY_{plan.mix}"])
    return int(file_type_for(_dominant_type(plan)))


def _dominant_type(plan: Plan) -> str:
    elems: dict[str, int] = {}
    for t, ty in zip(plan.tensors, plan.types):
        if t.quantizable:
            elems[ty] = elems.get(ty, 0) + t.numel
    return max(elems, key=lambda k: (elems[k], k)) if elems else "f16"


def write_gguf(lc: LlamaCpp, model_dir: Path, plan: Plan, scores_json: str | None,
               cfg: WriteConfig, progress: bool = True) -> Path:
    """Write the planned GGUF to ``.NAME.partial`` beside the target and return that path.

    The caller (:func:`lwq_gguf.pipeline.convert`) writes it inside
    ``files.atomic_output(target)``, verifies it there, and calls :func:`cleanup` afterwards.
    """
    work, partial = work_paths(cfg.output)
    check_imatrix(cfg.imatrix, plan)
    base_bytes = sum(t.numel for t in plan.tensors) * (4 if cfg.outtype == "f32" else 2)
    check_free_space(cfg.output.parent, base_bytes * cfg.two_step + plan.nbytes + (64 << 20))
    work.mkdir(exist_ok=True)
    # a llama.cpp preset's own recipe (plan.mix) is written as llama-quantize writes it
    kv = {} if plan.mix else lwq_metadata(plan, scores_json)
    job = ConverterJob(mode="write", src=str(lc.src), model=str(model_dir), out=str(partial),
                       outtype=cfg.outtype, kv=kv)
    try:
        if cfg.two_step:
            _two_step(lc, plan, cfg, job, progress)
        else:
            _one_pass(plan, cfg, job, progress)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(cfg.output, e) from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return partial


def _imatrix_arg(cfg: WriteConfig) -> str:
    """llama-quantize records the path it is given: one made in the work folder is named
    relatively, so the file does not depend on the output's name."""
    assert cfg.imatrix is not None
    return (cfg.imatrix.name if cfg.imatrix.parent == work_paths(cfg.output)[0]
            else str(cfg.imatrix.resolve()))


def _one_pass(plan: Plan, cfg: WriteConfig, job: ConverterJob, progress: bool) -> None:
    q = QuantizeSettings(types=dict(zip((t.name for t in plan.tensors), plan.types)),
                         ftype=_file_type(plan),
                         encoder=plan.config.encoder, threads=cfg.threads,
                         imatrix=str(cfg.imatrix) if cfg.imatrix else None,
                         imatrix_name=_imatrix_arg(cfg) if cfg.imatrix else None)
    with tqdm(total=len(plan.tensors), desc="quantize + write", unit="tensor",
              disable=not progress, leave=False) as bar:
        run_job(replace(job, mode="onepass", task=asdict(q)), onepass.__name__,
                lambda ln: bar.update(1) if ln.startswith(WRITTEN_MARK) else None)


def _two_step(lc: LlamaCpp, plan: Plan, cfg: WriteConfig, job: ConverterJob, progress: bool) -> None:
    work, partial = work_paths(cfg.output)
    base = work / "base.gguf"
    (work / "types.txt").write_text(plan.tensor_type_file())
    n = len(plan.tensors)
    with tqdm(total=n, desc=f"convert ({cfg.outtype})", unit="tensor", disable=not progress,
              leave=False) as bar:
        write_16bit(lc, Path(job.model), base, job.outtype, job.kv,
                    on_line=lambda ln: bar.update(1) if " --> " in ln else None)
    cmd = [str(lc.tool("llama-quantize"))]
    if cfg.imatrix:
        cmd += ["--imatrix", _imatrix_arg(cfg)]
    cmd += ["--tensor-type-file", "types.txt", str(base.resolve()), str(partial.resolve()),
            str(_file_type(plan)), str(cfg.threads or os.cpu_count() or 1)]
    step = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
    with tqdm(total=n, desc="quantize", unit="tensor", disable=not progress, leave=False) as bar:
        run_tool(cmd, what="llama-quantize", cwd=work,
                 on_line=lambda ln: bar.update(1) if step.match(ln) else None)


def cleanup(output: Path) -> None:
    """Remove what a failed or killed run left beside ``output`` (never ``output`` itself)."""
    work, partial = work_paths(output)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(guard_dir(output), ignore_errors=True)
    partial.unlink(missing_ok=True)
