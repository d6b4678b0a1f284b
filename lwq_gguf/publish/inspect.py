"""``lwq-gguf inspect``: what is inside any GGUF, from its header alone.

A :class:`Recipe` is one file's per-tensor types with their shapes and bytes (read by
:func:`lwq_gguf.quant.gguf_file.read_back`, which parses the header and skips the tensor data, so a
100 GB file is read in well under a second), its architecture and, for files lwq-gguf wrote, the
plan and layer scores it carries. :func:`describe` turns one or two into a JSON-able dict
(the per-layer x tensor-kind type map; with two, a diff of their recipes), :func:`render` into
text tables and :func:`heatmap` into a PNG.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lwq_gguf.errors import LwqError
from lwq_gguf.plan.budget import gib
from lwq_gguf.quant.gguf_file import FileInfo, read_back

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
EMBED = ("token_embd.weight", "output.weight")
OTHER = "other (norms, biases)"
SHOWN = 40  # differing tensors listed in the text diff (all of them in --json)


def split_name(name: str) -> tuple[int | None, str]:
    """'blk.3.ffn_down.weight' -> (3, 'ffn_down'); 'output.weight' -> (None, 'output')."""
    m = _BLOCK.match(name)
    layer, rest = (int(m.group(1)), m.group(2)) if m else (None, name)
    return layer, rest.removesuffix(".weight")


@dataclass(frozen=True)
class Recipe:
    path: Path
    info: FileInfo
    file_bytes: int

    @property
    def arch(self) -> str:
        return str(self.info.metadata.get("general.architecture", "?"))

    @property
    def matrices(self) -> list[str]:
        """The tensors a quantization recipe is about: every one with two or more dimensions."""
        return [n for n, s in self.info.shapes.items() if sum(d > 1 for d in s) >= 2]

    def json_field(self, key: str) -> dict | None:
        try:
            v = json.loads(str(self.info.metadata[key]))
        except (KeyError, ValueError):
            return None
        return v if isinstance(v, dict) else None

    def bpw(self, layers_only: bool = False) -> float:
        names = [n for n in self.info.types if not layers_only or split_name(n)[0] is not None]
        el = sum(math.prod(self.info.shapes[n]) for n in names)
        return sum(self.info.sizes[n] for n in names) * 8 / el if el else 0.0

    def kinds(self) -> dict[str, str]:
        """{tensor: its kind}: a layer kind ('ffn_down') for the matrices, 'other' for the rest."""
        keep = set(self.matrices)
        return {n: split_name(n)[1] if n in keep else OTHER for n in self.info.types}

    def kind_bytes(self) -> dict[str, int]:
        """Bytes per tensor kind (a layer kind summed over the layers)."""
        out: dict[str, int] = {}
        for n, kind in self.kinds().items():
            out[kind] = out.get(kind, 0) + self.info.sizes[n]
        return out


def read_recipe(path: Path) -> Recipe:
    if not path.is_file():
        raise LwqError(f"{path}: no such file: give the path of a .gguf file")
    info = read_back(path, "give a complete .gguf file (a download may have stopped early)")
    return Recipe(path, info, path.stat().st_size)


def layer_map(r: Recipe) -> tuple[list[str], dict[int, dict[str, str]]]:
    """(tensor kinds in file order, {layer: {kind: type}}) over the repeating layers' matrices."""
    kinds: list[str] = []
    per: dict[int, dict[str, str]] = {}
    for n in r.matrices:
        layer, kind = split_name(n)
        if layer is None:
            continue
        if kind not in kinds:
            kinds.append(kind)
        per.setdefault(layer, {})[kind] = r.info.types[n]
    return kinds, dict(sorted(per.items()))


def type_counts(r: Recipe) -> dict[str, dict[str, int]]:
    """{type: {tensors, params, bytes}} over every tensor, most parameters first."""
    agg: dict[str, dict[str, int]] = {}
    for n, ty in r.info.types.items():
        a = agg.setdefault(ty, {"tensors": 0, "params": 0, "bytes": 0})
        a["tensors"] += 1
        a["params"] += math.prod(r.info.shapes[n])
        a["bytes"] += r.info.sizes[n]
    return dict(sorted(agg.items(), key=lambda kv: -kv[1]["params"]))


def one(r: Recipe) -> dict:
    kinds, per = layer_map(r)
    plan, scores = r.json_field("lwq.plan"), r.json_field("lwq.scores")
    embed = {n: r.info.types[n] for n in EMBED if n in r.info.types}
    return {"file": str(r.path), "architecture": r.arch,
            "name": r.info.metadata.get("general.name"), "file_bytes": r.file_bytes,
            "tensors": len(r.info.types), "bpw": round(r.bpw(), 4),
            "bpw_layers": round(r.bpw(layers_only=True), 4),
            "embed_output_bytes": sum(r.info.sizes[n] for n in embed),
            "layer_bytes": sum(b for n, b in r.info.sizes.items() if split_name(n)[0] is not None),
            "embed_output": embed, "types": type_counts(r), "kinds": kinds,
            "layers": {str(k): v for k, v in per.items()},
            "imatrix": r.info.metadata.get("quantize.imatrix.file"),
            "lwq_plan": None if plan is None else plan.get("config"),
            "lwq_scores": None if scores is None else {k: scores.get(k) for k in ("lim", "zd")},
            "tensor_types": dict(r.info.types)}


def diff(a: Recipe, b: Recipe) -> dict:
    """Where two recipes differ: bytes per kind on each side, the tensors typed differently, the
    names only one file has."""
    ka, kb = a.kind_bytes(), b.kind_bytes()
    kinds = list(dict.fromkeys([*ka, *kb]))
    common = [n for n in a.info.types if n in b.info.types]
    changed = [{"tensor": n, "a": a.info.types[n], "b": b.info.types[n]}
               for n in common if a.info.types[n] != b.info.types[n]]
    per_kind, of = {}, a.kinds()
    for k in kinds:
        names = [n for n in common if of[n] == k]
        per_kind[k] = {"a_bytes": ka.get(k, 0), "b_bytes": kb.get(k, 0),
                       "tensors": len(names),
                       "differ": sum(a.info.types[n] != b.info.types[n] for n in names)}
    return {"same_architecture": a.arch == b.arch, "kinds": per_kind, "changed": changed,
            "only_a": sorted(set(a.info.types) - set(b.info.types)),
            "only_b": sorted(set(b.info.types) - set(a.info.types))}


def describe(paths: list[Path]) -> dict:
    recipes = [read_recipe(p) for p in paths]
    doc: dict[str, Any] = {"files": [one(r) for r in recipes]}
    if len(recipes) == 2:
        doc["diff"] = diff(*recipes)
    return doc


def render(doc: dict) -> str:
    """The text form of :func:`describe`'s dict."""
    from lwq_gguf.report import table

    out = []
    for f in doc["files"]:
        out.append(f"{f['file']}: {f['architecture']}, {gib(f['file_bytes'])} "
                   f"({f['file_bytes']:,} bytes), {f['tensors']} tensors, {f['bpw']:.3f} BPW "
                   f"({f['bpw_layers']:.3f} over the repeating layers); embedding/output "
                   f"{gib(f['embed_output_bytes'])} ("
                   + ", ".join(f"{k.removesuffix('.weight')} {v}"
                               for k, v in f["embed_output"].items())
                   + f"), layers {gib(f['layer_bytes'])}")
        total = sum(t["params"] for t in f["types"].values()) or 1
        out.append(table(("type", "tensors", "params", "share", "MiB"),
                         [(ty, t["tensors"], f"{t['params'] / 1e6:.2f}M",
                           f"{100 * t['params'] / total:.1f}%", f"{t['bytes'] / 2**20:.2f}")
                          for ty, t in f["types"].items()]))
        lim = (f["lwq_scores"] or {}).get("lim") or []
        rows = [[layer] + ([f"{lim[int(layer)]:.4f}"] if len(lim) > int(layer) else [])
                + [m.get(k, "") for k in f["kinds"]] for layer, m in f["layers"].items()]
        if rows:
            out.append(table(["layer"] + (["LIM"] if lim else []) + f["kinds"], rows))
        plan = f["lwq_plan"]
        out.append("lwq-gguf plan: " + (", ".join(f"{k} {plan[k]}" for k in
                                                  ("avg_bits", "strategy", "encoder")
                                                  if k in plan) if plan else
                                        "none (not written by lwq-gguf)")
                   + (f"; imatrix {f['imatrix']}" if f["imatrix"] else "; no imatrix recorded"))
    if "diff" in doc:
        d = doc["diff"]
        if not d["same_architecture"]:
            out.append("note: the two files are of different architectures")
        out.append(table(("kind", "MiB a", "MiB b", "b - a", "tensors differing"),
                         [(k, f"{v['a_bytes'] / 2**20:.2f}", f"{v['b_bytes'] / 2**20:.2f}",
                           f"{(v['b_bytes'] - v['a_bytes']) / 2**20:+.2f}",
                           f"{v['differ']}/{v['tensors']}") for k, v in d["kinds"].items()]))
        ch = d["changed"]
        if ch:
            out.append(table(("tensor", "a", "b"), [(c["tensor"], c["a"], c["b"])
                                                     for c in ch[:SHOWN]]))
        more = f" (the first {SHOWN} listed; --json has all)" if len(ch) > SHOWN else ""
        out.append(f"{len(ch)} tensor(s) typed differently{more}; only in a: "
                   f"{len(d['only_a'])}, only in b: {len(d['only_b'])}")
    return "\n".join(out)


def heatmap(doc: dict, png: Path) -> None:
    """Per file, a layer x tensor-kind map coloured by the type's bits per weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from lwq_gguf.files import atomic_output

    def bits(ty: str) -> float:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[ty.upper()]]
        return size * 8 / block

    files = doc["files"]
    used = [bits(ty) for f in files for m in f["layers"].values() for ty in m.values()] or [4.0]
    lo, hi = min(used), max(max(used), min(used) + 1)  # one scale for every panel
    n_layers = max([len(f["layers"]) for f in files] + [1])
    fig, axes = plt.subplots(1, len(files), figsize=(2 + 5.5 * len(files), 1.5 + 0.22 * n_layers),
                             squeeze=False)
    for ax, f in zip(axes[0], files):
        layers, kinds = list(f["layers"]), f["kinds"]
        grid = np.full((len(layers), max(1, len(kinds))), np.nan)
        for i, layer in enumerate(layers):
            for j, k in enumerate(kinds):
                if k in f["layers"][layer]:
                    grid[i, j] = bits(f["layers"][layer][k])
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=lo,
                       vmax=hi)
        for i, layer in enumerate(layers):
            for j, k in enumerate(kinds):
                ty = f["layers"][layer].get(k)
                if ty and len(layers) <= 64:
                    dark = (grid[i, j] - lo) / (hi - lo) > 0.6  # light cells get black text
                    ax.text(j, i, ty, ha="center", va="center", fontsize=5,
                            color="black" if dark else "white")
        ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
        ax.set_ylabel("layer")
        ax.set_title(f"{Path(f['file']).name}: {f['bpw']:.2f} BPW", fontsize=8)
        fig.colorbar(im, ax=ax, label="bits per weight")
    fig.tight_layout()
    with atomic_output(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
