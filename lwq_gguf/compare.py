"""Stage 5c - compare: layer-wise files against llama.cpp's own mixes, on the same chunks.

``run_compare`` builds (or reuses) into ``OUT/gguf/``:

* the 16-bit base (the pinned ``convert_hf_to_gguf.py``; bf16 for a bf16 checkpoint, else f16),
* llama.cpp's mixes (``llama-quantize BASE OUT Q3_K_M``, with ``--imatrix`` when given),
* the layer-wise files (:func:`lwq_gguf.pipeline.convert`, one scoring reused by every target),

then evaluates them all against the base with :func:`lwq_gguf.evaluate.evaluate_many` and writes
``compare.json``, ``compare.md`` and ``compare.png`` into OUT.

Reuse: ``OUT/.cache/files.json`` records each built file's recipe (what it was made from: model
fingerprint, base hash, type or plan settings, imatrix hash, tool versions) and its sha256; a file
is rebuilt only when its recipe changes or its bytes do. Evaluation results are cached in
``OUT/.cache/eval/`` by the sha256 of (file, base, text) and the protocol settings, so adding a
target evaluates only the new file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from lwq_gguf import __version__
from lwq_gguf.errors import LwqError, OutputError
from lwq_gguf.evaluate import EvalConfig, EvalResult, check_text, evaluate_many, resolve_device
from lwq_gguf.hfconvert import converter_write
from lwq_gguf.llamacpp import LlamaCpp, find_llama_cpp, run_tool
from lwq_gguf.load import HFModel, open_model
from lwq_gguf.imatrix import imatrix_from_dict, write_imatrix
from lwq_gguf.kquant import encoder_tag
from lwq_gguf.pipeline import convert, get_scores, imatrix_choice, load_scores, model_tensors
from lwq_gguf.plan import PlanConfig, check_reach
from lwq_gguf.quants import DEFAULT_BASELINES, mix_needs_imatrix
from lwq_gguf.score import ScoreConfig
from lwq_gguf.verify import read_back
from lwq_gguf.write import WriteConfig, atomic_write_text, check_output

COMPARE_FORMAT, COMPARE_VERSION = "lwq-gguf.compare", 1


@dataclass(frozen=True)
class CompareConfig:
    model: Path
    out_dir: Path
    text: Path
    targets: tuple[float, ...]
    plan: PlanConfig  # avg_bits is replaced by each target
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    imatrix: str = "auto"  # auto | none | a file: the same for both sides
    score: ScoreConfig = field(default_factory=ScoreConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    threads: int = 0


@dataclass(frozen=True)
class Entry:
    label: str  # "F16", "Q3_K_M", "lwq 3.5"
    kind: str  # base | llama.cpp | lwq-gguf
    path: Path
    recipe: str  # canonical JSON of what the file is made from


@dataclass(frozen=True)
class Row:
    label: str
    kind: str
    file: str
    size_mib: float
    bpw: float
    result: EvalResult
    dppl: float
    cached: bool

    def to_dict(self) -> dict:
        return {"label": self.label, "kind": self.kind, "file": self.file,
                "size_mib": self.size_mib, "bpw": self.bpw, "dppl": self.dppl,
                "cached": self.cached, **self.result.to_dict()}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _fingerprint(model: HFModel) -> str:
    """The source model's identity: every file's name, size and mtime, and config.json itself."""
    parts = [model.config_json]
    for p in sorted(model.path.iterdir()):
        if p.is_file():
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _recipe(**kw) -> str:
    return json.dumps({"lwq": __version__, **kw}, sort_keys=True, default=str)


def prepare_out_dir(out: Path) -> None:
    """Create OUT (its parent must exist) and prove it writable, before any work."""
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: the output folder's parent does not exist: create it or "
                          "choose another -o")
    try:
        out.mkdir(exist_ok=True)
        (out / "gguf").mkdir(exist_ok=True)
        (out / ".cache" / "eval").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output folder ({e.strerror}): choose another "
                          "-o") from None
    for name in ("compare.json", "gguf/probe", ".cache/probe"):
        check_output(out / name, force=True)


class _Files:
    """The recipe + sha256 manifest of OUT/.cache/files.json."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".cache" / "files.json"
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def fresh(self, e: Entry) -> bool:
        rec = self.data.get(e.path.name)
        return (rec is not None and rec["recipe"] == e.recipe and e.path.is_file()
                and e.path.stat().st_size == rec["size"])

    def sha256(self, e: Entry) -> str:
        rec = self.data[e.path.name]
        if rec.get("mtime_ns") != e.path.stat().st_mtime_ns:  # touched since: hash it again
            rec["sha256"], rec["mtime_ns"] = sha256_file(e.path), e.path.stat().st_mtime_ns
        return rec["sha256"]

    def record(self, e: Entry) -> None:
        st = e.path.stat()
        self.data[e.path.name] = {"recipe": e.recipe, "size": st.st_size,
                                  "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(e.path)}
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


def _publish_tmp(path: Path) -> Path:
    tmp = path.parent / f".{path.name}.partial"
    tmp.unlink(missing_ok=True)
    return tmp


def build_base(lc: LlamaCpp, model: HFModel, e: Entry, outtype: str) -> None:
    tmp = _publish_tmp(e.path)
    kv = e.path.parent / f".{e.path.name}.kv.json"
    try:
        kv.write_text("{}")
        converter_write(lc, model.path, tmp, outtype, kv)
        os.replace(tmp, e.path)
    finally:
        kv.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def build_mix(lc: LlamaCpp, base: Path, e: Entry, mix: str, imatrix: Path | None,
              threads: int) -> None:
    tmp = _publish_tmp(e.path)
    cmd = [str(lc.tool("llama-quantize"))]
    if imatrix:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(base), str(tmp), mix, str(threads or os.cpu_count() or 1)]
    try:
        run_tool(cmd, what=f"llama-quantize {mix}")
        os.replace(tmp, e.path)
    finally:
        tmp.unlink(missing_ok=True)


def _eval_key(sha: str, base_sha: str, text_sha: str, cfg: EvalConfig, device: str) -> str:
    blob = json.dumps([sha, base_sha, text_sha, cfg.ctx, cfg.chunks, device, __version__])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CompareResult:
    rows: tuple[Row, ...]
    text_sha256: str
    device: str
    seconds: float
    built: int
    evaluated: int

    @property
    def base(self) -> Row:
        return self.rows[0]


def plan_entries(cfg: CompareConfig, model: HFModel, lc: LlamaCpp) -> tuple[list[Entry], str]:
    """Every file of the comparison, base first, with its recipe; and the base's outtype."""
    name = model.path.resolve().name
    outtype = "bf16" if any(t.dtype == "BF16" for t in model.tensors) else "f16"
    fp = _fingerprint(model)
    gg = cfg.out_dir / "gguf"
    imat = cfg.imatrix if cfg.imatrix in ("auto", "none") else sha256_file(Path(cfg.imatrix))
    if imat == "auto":  # made from the calibration text with the scores
        imat = "auto:" + _recipe(model=fp, score=cfg.score)
    sfx = "" if cfg.imatrix == "none" else "-imat"
    base = Entry(outtype.upper(), "base", gg / f"{name}-{outtype.upper()}.gguf",
                 _recipe(kind="base", model=fp, outtype=outtype, llama_cpp=str(lc.root.name)))
    out = [base]
    for mix in cfg.baselines:
        out.append(Entry(mix, "llama.cpp", gg / f"{name}-{mix}{sfx}.gguf",
                         _recipe(kind="mix", base=base.recipe, mix=mix, imatrix=imat)))
    for bits in cfg.targets:
        pc = replace(cfg.plan, avg_bits=bits)
        out.append(Entry(f"lwq {bits:g}", "lwq-gguf",
                         gg / f"{name}-lwq-{pc.strategy}-{bits:g}{sfx}.gguf",
                         _recipe(kind="lwq", model=fp, plan=pc, imatrix=imat, score=cfg.score,
                                 encoder=encoder_tag(pc.encoder))))
    return out, outtype


def _check_inputs(cfg: CompareConfig, model: HFModel) -> None:
    """Everything that can be refused is refused before the first slow step."""
    if not cfg.text.is_file():
        raise LwqError(f"{cfg.text}: no such text file: pass --text FILE (e.g. wiki.test.raw)")
    imatrix_choice(cfg.imatrix)  # a named file must exist
    needy = [m for m in cfg.baselines if mix_needs_imatrix(m)]
    if needy and cfg.imatrix == "none":
        raise LwqError(f"--baselines {','.join(needy)}: llama.cpp needs an importance matrix "
                       "for these: pass --imatrix FILE or drop them")
    if not cfg.targets and not cfg.baselines:
        raise LwqError("nothing to compare: give --avg-bits and/or --baselines")
    tensors = model_tensors(model)
    for bits in cfg.targets:  # budgets and ladders are checked before any scoring
        check_reach(tensors, replace(cfg.plan, avg_bits=bits))


def _scores_file(cfg: CompareConfig, model: HFModel, files: _Files, progress: bool) -> Path:
    """Score once for every target: OUT/scores.json (with the sensitivity and imatrix), reused
    while model and settings match; OUT/imatrix.gguf is the imatrix both sides get with auto."""
    path = cfg.out_dir / "scores.json"
    key, given = imatrix_choice(cfg.imatrix)
    e = Entry("scores", "scores", path, _recipe(kind="scores", model=_fingerprint(model),
                                                score=cfg.score, ladder=cfg.plan.ladder, key=key,
                                                encoder=encoder_tag(cfg.plan.encoder)))
    if not files.fresh(e):
        scores = get_scores(model, None, cfg.score, progress, model_tensors(model),
                            cfg.plan.ladder, key, given, cfg.plan.encoder)
        atomic_write_text(path, scores.to_json())
        files.record(e)
    scores = load_scores(path, model)
    if key == "auto":
        write_imatrix(imatrix_from_dict(scores.imatrix), cfg.out_dir / "imatrix.gguf")
    return path


def run_compare(cfg: CompareConfig, progress: bool = True) -> CompareResult:
    t0 = time.time()
    lc = find_llama_cpp()
    device = resolve_device(lc, cfg.eval.device)
    prepare_out_dir(cfg.out_dir)
    model = open_model(cfg.model)
    _check_inputs(cfg, model)
    entries, outtype = plan_entries(cfg, model, lc)
    files = _Files(cfg.out_dir)
    stale = [e for e in entries if not files.fresh(e)]
    if entries[0] in stale:
        build_base(lc, model, entries[0], outtype)
        files.record(entries[0])
    check_text(entries[0].path, cfg.text, lc, cfg.eval.ctx)  # refuse a short text before building
    scores = None
    if any(e.kind == "lwq-gguf" for e in stale) or (
            cfg.imatrix == "auto" and any(e.kind == "llama.cpp" for e in stale)):
        scores = _scores_file(cfg, model, files, progress)
    imatrix = {"none": None, "auto": cfg.out_dir / "imatrix.gguf"}.get(cfg.imatrix,
                                                                       Path(cfg.imatrix))
    for e in tqdm([e for e in stale if e.kind != "base"], desc="build", unit="file",
                  disable=not progress):
        if e.kind == "llama.cpp":
            build_mix(lc, entries[0].path, e, e.label, imatrix, cfg.threads)
        else:
            pc = replace(cfg.plan, avg_bits=float(e.label.split()[1]))
            convert(cfg.model, WriteConfig(e.path, None, "auto", True, cfg.threads), plan_cfg=pc,
                    scores_file=scores, score_cfg=cfg.score, imatrix=cfg.imatrix, progress=False)
        files.record(e)

    text_sha = sha256_file(cfg.text)
    base_sha = files.sha256(entries[0])
    keys = [_eval_key(files.sha256(e), base_sha, text_sha, cfg.eval, device) for e in entries]
    cache = cfg.out_dir / ".cache" / "eval"
    todo = [i for i, k in enumerate(keys) if not (cache / f"{k}.json").is_file()]
    fresh = evaluate_many([entries[i].path for i in todo], cfg.text, lc,
                          replace(cfg.eval, device=device), entries[0].path, progress)
    for i, r in zip(todo, fresh):
        atomic_write_text(cache / f"{keys[i]}.json", json.dumps(r.to_dict()))
    results = [EvalResult(**json.loads((cache / f"{k}.json").read_text())) for k in keys]

    rows = []
    for i, (e, r) in enumerate(zip(entries, results)):
        rows.append(Row(e.label, e.kind, str(e.path.relative_to(cfg.out_dir)),
                        e.path.stat().st_size / 2**20, read_back(e.path).bpw, r,
                        r.ppl - results[0].ppl, i not in todo))
    return CompareResult(tuple(rows), text_sha, device, time.time() - t0, len(stale), len(todo))


def write_outputs(cfg: CompareConfig, res: CompareResult, command: str) -> tuple[Path, Path, Path]:
    """compare.json, compare.md and compare.png in OUT."""
    from lwq_gguf.report import (COMPARE_HEADERS, compare_rows, machine, markdown_table,
                                 plot_compare)

    out = cfg.out_dir
    where = machine()
    setting = (f"{res.base.result.chunks} chunks x {cfg.eval.ctx} tokens of {cfg.text.name} "
               f"(sha256 {res.text_sha256[:12]}), llama.cpp on {res.device}")
    imat = {"none": "no imatrix", "auto": "imatrix from the calibration text on both sides"}.get(
        cfg.imatrix, f"imatrix {Path(cfg.imatrix).name} on both sides")
    doc = {"format": COMPARE_FORMAT, "version": COMPARE_VERSION, "lwq_version": __version__,
           "model": str(cfg.model), "text": str(cfg.text), "text_sha256": res.text_sha256,
           "ctx": cfg.eval.ctx, "chunks": res.base.result.chunks, "device": res.device,
           "imatrix": str(cfg.imatrix), "strategy": cfg.plan.strategy,
           "machine": where, "command": command, "rows": [r.to_dict() for r in res.rows]}
    json_path, md_path, png_path = out / "compare.json", out / "compare.md", out / "compare.png"
    atomic_write_text(json_path, json.dumps(doc, indent=1))
    md = [f"# {cfg.model.resolve().name}: layer-wise vs llama.cpp mixes", "",
          f"Command: `{command}`", "", f"Machine: {where}", "",
          f"Evaluation: {setting}; base {res.base.label}; {imat}; layer-wise strategy "
          f"{cfg.plan.strategy}. KLD = KL(base || file) per scored token, mean ± error.", "",
          markdown_table(COMPARE_HEADERS, compare_rows(res.rows)), "", "![KLD vs BPW](compare.png)",
          ""]
    atomic_write_text(md_path, "\n".join(md))
    plot_compare(res.rows, png_path, f"{cfg.model.resolve().name}: {setting}; {imat}")
    return json_path, md_path, png_path
