"""The model card of a family: ``OUTDIR/README.md`` as Hugging Face shows GGUF repositories.

Everything in it comes from the run that just finished: the files as read back, their types per
layer (:mod:`lwq_gguf.publish.inspect`), and - with ``--eval TEXT`` - the rows of the comparison
that measured them beside llama.cpp's mixes (:mod:`lwq_gguf.publish.compare`), so the card's
numbers are compare.json's. Front matter: ``base_model``, ``license`` and ``language`` from the
source folder's own README front matter (else ``base_model`` from config.json's
``_name_or_path``, or the folder name), ``quantized_by``, ``tags``, ``pipeline_tag``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from lwq_gguf import __version__
from lwq_gguf.evaluate.metrics import metrics
from lwq_gguf.files import atomic_write_text, sha256_file
from lwq_gguf.publish.inspect import describe, heatmap

CARD_FILES = ("README.md", "kld-vs-size.png")  # what the card writes besides types-*.png


@dataclass(frozen=True, kw_only=True)
class CardInput:
    model: Path  # the source Hugging Face folder
    files: tuple[tuple[str, Path], ...]  # (target label, written GGUF), smallest first
    command: str
    calib: Path  # the calibration text
    calib_tokens: int
    imatrix: str  # how the files were quantized, in words
    llama_cpp: str  # the pinned build's name
    evaluation: dict | None = None  # compare.json's document (write_outputs), or None


def source_meta(model: Path) -> dict:
    """base_model, license, language as the source folder states them (nothing invented)."""
    meta: dict = {}
    readme = model / "README.md"
    if readme.is_file():
        m = re.match(r"^---\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
        if m:
            import yaml

            try:
                front = yaml.safe_load(m.group(1)) or {}
            except yaml.YAMLError:
                front = {}
            if isinstance(front, dict):
                meta = {k: front[k] for k in ("license", "language", "base_model") if k in front}
    if "base_model" not in meta:
        try:
            name = json.loads((model / "config.json").read_text()).get("_name_or_path")
        except (OSError, ValueError):
            name = None
        meta["base_model"] = name if isinstance(name, str) and "/" in name else model.resolve().name
    return meta


def _front_matter(inp: CardInput, arch: str) -> str:
    import yaml

    meta = source_meta(inp.model)
    doc = {"base_model": meta["base_model"], "quantized_by": f"lwq-gguf {__version__}",
           "tags": ["gguf", "llama.cpp", "lwq-gguf", "mixed-precision", arch],
           "pipeline_tag": "text-generation"}
    doc.update({k: meta[k] for k in ("license", "language") if k in meta})
    return "---\n" + yaml.safe_dump(doc, sort_keys=False).strip() + "\n---\n"


def _types_used(f: dict) -> str:
    total = sum(t["params"] for t in f["types"].values()) or 1
    return ", ".join(f"{ty} {100 * t['params'] / total:.0f}%" for ty, t in f["types"].items()
                     if t["params"] / total >= 0.005)


def _quality(ev: dict, names: dict[str, str]) -> list[str]:
    """The evaluation table: every measured file, family and mixes, by size."""
    rows = sorted((r for r in ev["rows"] if r["kind"] != "base"), key=lambda r: r["size_mib"])
    shown = metrics("kld_mean", "same_top_pct", "ppl")
    out = ["| file | MiB | BPW | " + " | ".join(m.label for m in shown) + " |",
           "|---|---|---|" + "---|" * len(shown)]
    for r in rows:
        label = (f"**{names.get(r['label'], r['label'])}**" if r["kind"] == "lwq-gguf"
                 else f"llama.cpp {r['label']}")
        out.append(f"| {label} | {r['size_mib']:.1f} | {r['bpw']:.3f} | "
                   + " | ".join(m.cell(r) for m in shown) + " |")
    base = next(r for r in ev["rows"] if r["kind"] == "base")
    out.append(f"\n{ev['chunks']} chunks × {ev['ctx']} tokens of `{Path(ev['text']).name}` "
               f"(sha256 {ev['text_sha256'][:12]}), llama.cpp on {ev['device']} "
               f"(llama-perplexity's protocol: KLD against the {base['label']} GGUF on the "
               f"second half of each chunk; its PPL {base['ppl']:.3f}); imatrix "
               f"{ev['imatrix']} on both sides; {ev['machine']}.")
    return out


def write_card(inp: CardInput, out_dir: Path) -> Path:
    """README.md (+ types-LABEL.png per file, kld-vs-size.png with an evaluation) in out_dir."""
    from lwq_gguf.report import plot_kld, table

    doc = describe([p for _, p in inp.files])
    files = doc["files"]
    arch = files[0]["architecture"] if files else "?"
    name = inp.model.resolve().name
    lines = [_front_matter(inp, arch), f"# {name}: layer-wise mixed-precision GGUF", "",
             f"{len(files)} GGUF file(s) of `{source_meta(inp.model)['base_model']}` for "
             "llama.cpp and Ollama, made by lwq-gguf: every weight tensor has its own "
             "quantization type, chosen by its measured effect on the output (expected "
             "KL-divergence) for the file's size.", "", "## Files", "",
             "| file | size | BPW | repeating layers BPW | types (share of weights) |",
             "|---|---|---|---|---|"]
    for f in files:
        lines.append(f"| [{Path(f['file']).name}]({Path(f['file']).name}) | "
                     f"{f['file_bytes'] / 2**20:.1f} MiB | {f['bpw']:.3f} | "
                     f"{f['bpw_layers']:.3f} | {_types_used(f)} |")
    names = {f"lwq {label}": Path(p).name for label, p in inp.files}
    if inp.evaluation is not None:
        lines += ["", "## Quality", "", *_quality(inp.evaluation, names), "",
                  "![mean KLD against file size](kld-vs-size.png)"]
        plot_kld({name: [(r["size_mib"], r["kld_mean"], names.get(r["label"], r["label"]))
                         for r in inp.evaluation["rows"] if r["kind"] == kind]
                  for kind, name in (("llama.cpp", "llama.cpp mixes"),
                                     ("lwq-gguf", "this family (lwq-gguf)"))},
                 out_dir / "kld-vs-size.png", "file size (MiB)")
    lines += ["", "## Types per layer", ""]
    for (label, path), f in zip(inp.files, files):
        png = f"types-{label}.png"
        heatmap({"files": [f]}, out_dir / png)
        rows = [[layer] + [m.get(k, "") for k in f["kinds"]] for layer, m in f["layers"].items()]
        lines += [f"![{path.name}: type of every tensor per layer]({png})", "",
                  f"<details><summary>{path.name}: table</summary>", "", "```",
                  table(["layer"] + f["kinds"], rows),
                  "embedding/output: " + ", ".join(f"{k} {v}" for k, v in
                                                   f["embed_output"].items()), "```",
                  "</details>", ""]
    lines += ["## How it was made", "", f"- command: `{inp.command}`",
              f"- lwq-gguf {__version__}; llama.cpp `{inp.llama_cpp}`",
              f"- calibration: `{inp.calib.name}` (sha256 {sha256_file(inp.calib)[:16]}), "
              f"{inp.calib_tokens} tokens; {inp.imatrix}",
              f"- {time.strftime('%Y-%m-%d')}", "", "## How to run", "", "```",
              f"llama-cli -m {Path(files[0]['file']).name} -cnv" if files else "",
              f"llama-server -m {Path(files[0]['file']).name} --port 8080" if files else "",
              "```", "", "Ollama: `ollama run hf.co/USER/REPO:FILE` once uploaded, or locally "
              "`ollama create NAME -f FILE.Modelfile` (`convert --ollama` writes one per file).",
              ""]
    readme = out_dir / "README.md"
    atomic_write_text(readme, "\n".join(lines))
    return readme
