"""Compare: layer-wise files against llama.cpp's own mixes, on the same chunks.

``run_compare`` builds (or reuses) into ``OUT/gguf/``:

* the 16-bit base (the pinned ``convert_hf_to_gguf.py``; bf16 for a bf16 checkpoint, else f16),
* llama.cpp's mixes (``llama-quantize BASE OUT Q3_K_M``, with ``--imatrix`` when given),
* the layer-wise files (:func:`lwq_gguf.pipeline.convert`, one scoring reused by every target),

then evaluates them all against the base with :func:`lwq_gguf.evaluate.evaluate_many` and writes
``compare.json``, ``compare.md`` and ``compare.png`` into OUT.

Reuse: ``OUT/.cache/files.json`` records each built file's recipe (what it was made from: model
fingerprint, base hash, type or plan settings, imatrix hash, llama.cpp install, and the digest of
the lwq-gguf code that builds it) and its sha256; a file is rebuilt only when its recipe changes
or its bytes do (``--rescore`` measures the scores again and rebuilds the layer-wise files).
Evaluation results are cached in ``OUT/.cache/eval/`` by the sha256 of (file, base, text), the
protocol settings and the evaluation code's digest, so adding a target evaluates only the new
file.
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
from lwq_gguf.evaluate.perplexity import (EvalConfig, EvalResult, check_text,
                                          evaluate_many, llama_device)
from lwq_gguf.files import (Reads, atomic_output, atomic_write_text, check_output, code_digest,
                            sha256_file)
from lwq_gguf.quant.gguf_file import read_back
from lwq_gguf.llamacpp import LlamaCpp, find_llama_cpp, run_tool
from lwq_gguf.model.load import HFModel, open_model
from lwq_gguf.pipeline import Job, convert, get_scores, load_scores
from lwq_gguf.plan.plan import PlanConfig, check_reach
from lwq_gguf.quant.encoder import damage_key, encoder_tag
from lwq_gguf.quant.imatrix import ImatrixChoice
from lwq_gguf.quant.types import DEFAULT_BASELINES, mix_needs_imatrix
from lwq_gguf.score.cache import CODE as SCORE_CODE
from lwq_gguf.score.scores import ScoreConfig
from lwq_gguf.model.inventory import model_tensors, write_16bit
from lwq_gguf.write.writer import WriteConfig

COMPARE_FORMAT, COMPARE_VERSION = "lwq-gguf.compare", 1
# the lwq-gguf code each kind of entry is made by (its digest is part of the entry's recipe)
BASE_CODE = ("model/inventory.py",)  # the 16-bit base (then llama-quantize for the mixes)
# scores.json and the imatrix computed with them: SCORE_CODE, the score cache's own key
# layer-wise files (with the check against llama.cpp's mixes)
BUILD_CODE = ("model", "quant", "score", "plan", "write", "pipeline.py")
EVAL_CODE = ("evaluate/perplexity.py", "evaluate/runner.py")  # what measures them


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    model: Path
    out_dir: Path
    text: Path
    targets: tuple[float, ...]
    plan: PlanConfig  # avg_bits is replaced by each target
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    imatrix: ImatrixChoice = field(default_factory=ImatrixChoice)  # the same for both sides
    score: ScoreConfig = field(default_factory=ScoreConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    threads: int = 0
    # layer-wise files already written (a family, lwq_gguf.publish): (label, path), measured
    # beside the mixes as they are
    files: tuple[tuple[str, Path], ...] = ()
    reads: Reads = field(default_factory=Reads)  # what no output may replace (files.Reads)


@dataclass(frozen=True)
class Entry:
    label: str  # "F16", "Q3_K_M", "lwq 3.5"
    kind: str  # base | llama.cpp | lwq-gguf | scores
    path: Path
    recipe: str  # canonical JSON of what the file is made from
    bits: float | None = None  # a layer-wise file's target


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


def _fingerprint(model: HFModel) -> str:
    """The source model's identity: every file's name, size and mtime, and config.json itself."""
    parts = [model.config_json]
    for p in sorted(model.path.iterdir()):
        if p.is_file():
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _recipe(code: str | None, **kw) -> str:
    """Canonical JSON of what an entry is made from, with the digest of the lwq-gguf code that
    makes it (None for llama.cpp's mixes: their base's and imatrix's recipes carry it)."""
    return json.dumps({"code": code, **kw}, sort_keys=True, default=str)


OUT_FILES = ("compare.json", "compare.md", "compare.png", "scores.json", "imatrix.gguf")


def prepare_out_dir(out: Path, reads: Reads | None = None) -> None:
    """Create OUT (its parent must exist) and prove it writable, before any work; OUT is not a
    model folder nor holds one, and none of its files is an input (``reads``)."""
    reads = reads or Reads()
    reads.check_folder(out)
    for name in OUT_FILES:
        reads.check(out / name)
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
    """The recipe + sha256 manifest of OUT/.cache/files.json (malformed entries are dropped)."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".cache" / "files.json"
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        keys = {"recipe": str, "size": int, "mtime_ns": int, "sha256": str}
        self.data = {k: v for k, v in data.items() if isinstance(v, dict) and all(
            isinstance(v.get(f), t) for f, t in keys.items())} if isinstance(data, dict) else {}

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


def build_base(lc: LlamaCpp, model: HFModel, e: Entry, outtype: str) -> None:
    with atomic_output(e.path) as tmp:
        write_16bit(lc, model.path, tmp, outtype)


def build_mix(lc: LlamaCpp, base: Path, e: Entry, imatrix: Path | None, threads: int) -> None:
    cmd = [str(lc.tool("llama-quantize"))]
    if imatrix:
        cmd += ["--imatrix", str(imatrix)]
    with atomic_output(e.path) as tmp:
        cmd += [str(base), str(tmp), e.label, str(threads or os.cpu_count() or 1)]
        run_tool(cmd, what=f"llama-quantize {e.label}")


def _eval_key(sha: str, base_sha: str, text_sha: str, cfg: EvalConfig, setting: str) -> str:
    """``setting``: the device and the evaluation code's digest."""
    blob = json.dumps([sha, base_sha, text_sha, cfg.ctx, cfg.chunks, setting])
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
    imat = cfg.imatrix.key
    if imat == "auto":  # made from the calibration text with the scores
        imat = "auto:" + _recipe(code_digest(*SCORE_CODE), model=fp, score=cfg.score)
    sfx = "-imat" if cfg.imatrix.used else ""
    base = Entry(outtype.upper(), "base", gg / f"{name}-{outtype.upper()}.gguf",
                 _recipe(code_digest(*BASE_CODE), kind="base", model=fp, outtype=outtype,
                         llama_cpp=str(lc.root.name)))
    out = [base]
    for mix in cfg.baselines:
        out.append(Entry(mix, "llama.cpp", gg / f"{name}-{mix}{sfx}.gguf",
                         _recipe(None, kind="mix", base=base.recipe, mix=mix, imatrix=imat)))
    build = code_digest(*BUILD_CODE)
    for bits in cfg.targets:
        pc = replace(cfg.plan, avg_bits=bits)
        pinned = "".join(f"-{k}-{v}" for k, v in (("embd", pc.token_embedding_type),
                                                 ("out", pc.output_tensor_type)) if v != "auto")
        out.append(Entry(f"lwq {bits:g}", "lwq-gguf",
                         gg / f"{name}-lwq-{pc.strategy}-{bits:g}{pinned}{sfx}.gguf",
                         _recipe(build, kind="lwq", model=fp, plan=pc, imatrix=imat,
                                 score=cfg.score, encoder=encoder_tag(pc.encoder)), bits))
    for label, path in cfg.files:  # (their bytes' sha256 keys their evaluations)
        out.append(Entry(label, "lwq-gguf", path, _recipe(None, kind="given",
                                                          path=str(path.resolve()))))
    return out, outtype


def _check_inputs(cfg: CompareConfig, model: HFModel) -> None:
    """Everything that can be refused is refused before the first slow step."""
    if not cfg.text.is_file():
        raise LwqError(f"{cfg.text}: no such text file: pass --text FILE (e.g. wiki.test.raw)")
    size = cfg.text.stat().st_size  # a token covers at least one byte (BOS and a SentencePiece
    if size + 2 < 2 * cfg.eval.ctx:  # prefix aside): refused now, before building anything
        raise LwqError(f"{cfg.text}: too short: {size} bytes cannot make 2 chunks of "
                       f"{cfg.eval.ctx} tokens; give a longer text or a smaller --ctx")
    needy = [m for m in cfg.baselines if mix_needs_imatrix(m)]
    if needy and not cfg.imatrix.used:
        raise LwqError(f"--baselines {','.join(needy)}: llama.cpp needs an importance matrix "
                       "for these: pass --imatrix FILE or drop them")
    if not cfg.targets and not cfg.baselines and not cfg.files:
        raise LwqError("nothing to compare: give --avg-bits and/or --baselines")
    tensors = model_tensors(model)
    for bits in cfg.targets:  # budgets and ladders are checked before any scoring
        check_reach(tensors, replace(cfg.plan, avg_bits=bits), imatrix=cfg.imatrix.used)


def _job(cfg: CompareConfig, **kw) -> Job:
    return Job(model=cfg.model, score=cfg.score, imatrix=cfg.imatrix, progress=False, **kw)


def _scores_file(cfg: CompareConfig, model: HFModel, files: _Files, progress: bool) -> Path:
    """Score once for every target: OUT/scores.json (with the sensitivity and imatrix), reused
    while model, settings and code match (--rescore: measured again); OUT/imatrix.gguf is the
    imatrix both sides get with auto."""
    path = cfg.out_dir / "scores.json"
    e = Entry("scores", "scores", path, _recipe(code_digest(*SCORE_CODE), kind="scores",
                                                model=_fingerprint(model),
                                                score=cfg.score, ladder=cfg.plan.ladder,
                                                key=cfg.imatrix.key,
                                                encoder=encoder_tag(cfg.plan.encoder)))
    if cfg.score.rescore or not files.fresh(e):
        job = replace(_job(cfg), progress=progress)
        scores = get_scores(job, model, model_tensors(model), cfg.plan.ladder,
                            (damage_key(cfg.imatrix.key, cfg.plan.encoder),))
        atomic_write_text(path, scores.to_json())
        files.record(e)
    cfg.imatrix.file_for_llama(load_scores(path, model).imatrix, cfg.out_dir / "imatrix.gguf")
    return path


def _cached_result(path: Path) -> EvalResult | None:
    try:
        return EvalResult(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # absent or malformed: measured again


def run_compare(cfg: CompareConfig, progress: bool = True) -> CompareResult:
    t0 = time.time()
    lc = find_llama_cpp()
    device = llama_device(lc, cfg.eval.device)
    prepare_out_dir(cfg.out_dir, cfg.reads)
    model = open_model(cfg.model)
    _check_inputs(cfg, model)
    entries, outtype = plan_entries(cfg, model, lc)
    for e in entries:
        cfg.reads.check(e.path)
    files = _Files(cfg.out_dir)
    stale = [e for e in entries if not files.fresh(e)
             or (cfg.score.rescore and e.kind == "lwq-gguf")]
    if entries[0] in stale:
        build_base(lc, model, entries[0], outtype)
        files.record(entries[0])
    check_text(entries[0].path, cfg.text, lc, cfg.eval.ctx)  # refuse a short text before building
    scores = None
    if any(e.bits is not None for e in stale) or (
            cfg.imatrix.mode == "auto" and any(e.kind == "llama.cpp" for e in stale)):
        scores = _scores_file(cfg, model, files, progress)
    imatrix = cfg.out_dir / "imatrix.gguf" if cfg.imatrix.mode == "auto" else cfg.imatrix.path
    for e in tqdm([e for e in stale if e.kind != "base"], desc="build", unit="file",
                  disable=not progress):
        if e.kind == "llama.cpp":
            build_mix(lc, entries[0].path, e, imatrix, cfg.threads)
        elif e.bits is not None:
            job = _job(cfg, plan=replace(cfg.plan, avg_bits=e.bits), scores_file=scores)
            convert(job, WriteConfig(output=e.path, force=True, threads=cfg.threads))
        files.record(e)

    text_sha = sha256_file(cfg.text)
    base_sha = files.sha256(entries[0])
    setting = f"{device}:{code_digest(*EVAL_CODE)}"
    keys = [_eval_key(files.sha256(e), base_sha, text_sha, cfg.eval, setting) for e in entries]
    cache = cfg.out_dir / ".cache" / "eval"
    results = [_cached_result(cache / f"{k}.json") for k in keys]
    todo = [i for i, r in enumerate(results) if r is None]
    fresh = evaluate_many([entries[i].path for i in todo], cfg.text, lc,
                          replace(cfg.eval, device=device), entries[0].path, progress)
    for i, r in zip(todo, fresh):
        atomic_write_text(cache / f"{keys[i]}.json", json.dumps(r.to_dict()))
        results[i] = r

    done = [r for r in results if r is not None]
    assert len(done) == len(entries)
    rows = [Row(e.label, e.kind, os.path.relpath(e.path, cfg.out_dir), e.path.stat().st_size / 2**20,
                read_back(e.path).bpw, r, r.ppl - done[0].ppl, i not in todo)
            for i, (e, r) in enumerate(zip(entries, done))]
    return CompareResult(tuple(rows), text_sha, device, time.time() - t0, len(stale), len(todo))


def write_outputs(cfg: CompareConfig, res: CompareResult, command: str) -> tuple[Path, Path, Path]:
    """compare.json, compare.md and compare.png in OUT."""
    from lwq_gguf.report import (COMPARE_HEADERS, compare_rows, machine, markdown_table,
                                 plot_compare)

    out = cfg.out_dir
    where = machine()
    setting = (f"{res.base.result.chunks} chunks x {cfg.eval.ctx} tokens of {cfg.text.name} "
               f"(sha256 {res.text_sha256[:12]}), llama.cpp on {res.device}")
    imat = f"{cfg.imatrix.describe()} on both sides"
    doc = {"format": COMPARE_FORMAT, "version": COMPARE_VERSION, "lwq_version": __version__,
           "model": str(cfg.model), "text": str(cfg.text), "text_sha256": res.text_sha256,
           "ctx": cfg.eval.ctx, "chunks": res.base.result.chunks, "device": res.device,
           "imatrix": cfg.imatrix.key, "strategy": cfg.plan.strategy,
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
