"""The package's shape: stages import only their own or lower layers, no import cycle, small
functions and modules, no private attributes of other libraries."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lwq_gguf"
# lowest first: a module may import from its own layer or a lower one
# (the floors of docs/design.md's table)
LAYERS = (("__init__", "errors", "files", "llamacpp", "process"), ("evaluate", "model", "quant"),
          ("score", "plan"), ("write", "report"), ("pipeline",), ("publish",),
          ("cli", "__main__"))


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
        out[".".join(("lwq_gguf",) + parts)] = f
    return out


def _imports(f: Path) -> set[str]:
    """Every lwq_gguf module ``f`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lwq_gguf"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lwq_gguf"))
    return found


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_stages_import_only_lower_layers():
    mods = _modules()
    bad = []
    for name, f in mods.items():
        for imp in _imports(f) & set(mods):
            if _layer(imp) > _layer(name):
                bad.append(f"{name} -> {imp}")
    assert not bad, bad


def test_at_most_eight_floors_as_the_imports_stand():
    """The longest chain of imports between the packages (the base modules as one floor, the
    CLI with its ``__main__``) is the number of floors: at most 8, and docs/design.md's table
    has one row per floor."""
    mods = _modules()

    def room(m: str) -> str:
        top = m.split(".")[1] if "." in m else "__init__"
        return "base" if _layer(m) == 0 else "cli" if top == "__main__" else top

    deps: dict[str, set[str]] = {}
    for n, f in mods.items():
        deps.setdefault(room(n), set()).update(room(i) for i in _imports(f) & set(mods))
    for r in deps:
        deps[r].discard(r)
    floors: dict[str, int] = {}

    def floor(r: str) -> int:
        if r not in floors:
            floors[r] = 1 + max((floor(d) for d in deps[r]), default=0)
        return floors[r]

    assert max(map(floor, deps)) <= 8, floors
    assert max(map(floor, deps)) == len(LAYERS), (floors, LAYERS)
    design = (PKG.parent / "docs" / "design.md").read_text()
    rows = [ln for ln in design.splitlines() if ln.startswith("| ") and ln[2:3].isdigit()]
    assert len(rows) == len(LAYERS), rows


def test_the_write_stage_does_not_depend_on_scoring():
    """The tensor list and the converter child live low (model/inventory.py): writing a planned
    file needs the plan, never the scoring code."""
    mods = _modules()
    bad = [f"{n} -> {imp}" for n, f in mods.items() if n.startswith("lwq_gguf.write")
           for imp in _imports(f) & set(mods) if imp.startswith("lwq_gguf.score")]
    assert not bad, bad


def test_no_import_cycle():
    mods = _modules()
    graph = {n: sorted(_imports(f) & set(mods) - {n}) for n, f in mods.items()}
    # a package's __init__ is imported with any of its modules: count that edge as well
    for n in mods:
        parent = n.rsplit(".", 1)[0]
        if parent in mods and parent != n:
            graph[n].append(parent)
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in graph[n]:
            assert state.get(m) != 1, " -> ".join(path + [m])
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])


def test_small_functions_and_modules():
    long_modules = [f.name for f in PKG.rglob("*.py") if len(f.read_text().splitlines()) > 420]
    assert not long_modules, long_modules
    wide = []
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                n = len([x for x in names if x not in ("self", "cls")])
                if n > 6:
                    wide.append(f"{f.relative_to(PKG)}:{node.name} ({n})")
    assert not wide, wide


def test_no_private_attributes_of_other_libraries():
    """llama_cpp, gguf, torch, concurrent.futures: public API only."""
    needles = ("._ctx", "._batch", "._model.", "llama_cpp._", "._max_workers", "gguf._")
    hits = [f"{f.relative_to(PKG)}: {n}" for f in PKG.rglob("*.py") for n in needles
            if n in f.read_text()]
    assert not hits, hits


def test_configs_are_frozen_and_built_with_keywords():
    from lwq_gguf.publish.compare import CompareConfig
    from lwq_gguf.evaluate.perplexity import EvalConfig
    from lwq_gguf.pipeline import Job
    from lwq_gguf.plan.plan import PlanConfig
    from lwq_gguf.quant.imatrix import ImatrixChoice
    from lwq_gguf.score.scores import ScoreConfig
    from lwq_gguf.write.writer import WriteConfig

    for cls in (CompareConfig, EvalConfig, Job, PlanConfig, ImatrixChoice, ScoreConfig,
                WriteConfig):
        import dataclasses

        assert cls.__dataclass_params__.frozen, cls
        assert all(f.kw_only for f in dataclasses.fields(cls)), cls
