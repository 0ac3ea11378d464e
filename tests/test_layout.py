"""The package's shape: every module imports on its own, no import cycle (module-level or inside a
function), no private name imported across modules, and the layering docs/architecture.md states
(config → presets → data → models → losses → train → eval → experiment → runlist → analysis → plots →
retrieval → widgets, then the paper's application, nbsrc.paper) is the one the imports follow: the
presets only describe (they import the config, nothing that runs, and no torch), the widgets only build
widgets on top of everything else, and the library never imports nbsrc.paper (only the command line,
nbsrc.__main__, calls both). The benchmarks live outside the package (bench/), and no two modules share
a file name."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "nbsrc"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(path: Path) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` for every ``nbsrc`` import in the file, at module
    level or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "nbsrc"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "nbsrc":
            out += [(node.module, a.name, node.lineno) for a in node.names]
    return out


def edges() -> dict[str, set[str]]:
    """Module -> the nbsrc modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    graph = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for target, name, _ in imports_of(path):
            full = f"{target}.{name}" if name is not None and f"{target}.{name}" in MODULES else target
            if full != mod and full in MODULES:
                graph[mod].add(full)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle():
    found = cycles(edges())
    assert not found, f"import cycles (module-level or inside functions): {found}"


def test_no_private_name_imported_across_modules():
    bad = [f"{mod}:{line} imports {target}.{name}" for mod, path in MODULES.items()
           for target, name, line in imports_of(path)
           if name is not None and name.startswith("_") and not name.startswith("__")
           and f"{target}.{name}" not in MODULES]
    assert not bad, bad


LAYERS = ["errors", "progress", "workers", "config", "presets", "data", "models", "losses", "train", "eval",
          "experiment", "runlist", "analysis", "plots", "retrieval", "widgets", "paper"]
CLI = "nbsrc.__main__"  # the command line: above the library and the paper's application, it calls both


def test_layers_import_only_downwards():
    """A module of one layer imports no module of a later layer in :data:`LAYERS`."""
    rank = {name: i for i, name in enumerate(LAYERS)}

    def layer(mod: str) -> int | None:
        part = mod.split(".")[1] if "." in mod else None
        return rank.get(part)

    bad = [f"{m} -> {t}" for m, targets in edges().items() for t in targets
           if layer(m) is not None and layer(t) is not None and layer(t) > layer(m)]
    assert not bad, bad


def is_paper(mod: str) -> bool:
    return mod == "nbsrc.paper" or mod.startswith("nbsrc.paper.")


def test_the_library_never_imports_the_paper():
    """No module of the library (every nbsrc module outside :mod:`nbsrc.paper`, the command line aside)
    imports :mod:`nbsrc.paper`, at module level or inside a function, in any spelling."""
    bad = [f"{mod}:{line} imports {target}" + (f".{name}" if name else "")
           for mod, path in MODULES.items() if not is_paper(mod) and mod != CLI
           for target, name, line in imports_of(path)
           if is_paper(target) or (target == "nbsrc" and name == "paper")]
    assert not bad, bad


def test_the_paper_finds_the_repository_folders_it_names():
    """The paper's modules sit one level below the package: the paths they compute from ``__file__`` (the
    notebooks folder) point at the repository's folders, and the presets' folder is the package's."""
    from nbsrc.paper.notebooks import NOTEBOOKS_DIR
    from nbsrc.presets import PRESETS_DIR

    assert NOTEBOOKS_DIR == ROOT / "notebooks" and sorted(NOTEBOOKS_DIR.glob("0*.ipynb")), NOTEBOOKS_DIR
    assert PRESETS_DIR == PKG / "presets" and sorted(PRESETS_DIR.glob("*.json")), PRESETS_DIR


def test_benchmarks_sit_outside_the_package_and_file_names_do_not_repeat():
    """``bench/`` (``python -m bench``) is a folder of the repository, not part of the installed package, and
    every module of nbsrc has its own file name (``__init__`` and ``__main__`` aside), so a name says what
    the file holds."""
    assert not sorted((PKG / "bench").glob("*.py")) and (ROOT / "bench" / "__main__.py").exists()
    names = {}
    for p in PKG.rglob("*.py"):
        if p.stem not in ("__init__", "__main__"):
            names.setdefault(p.name, []).append(str(p.relative_to(ROOT)))
    repeated = {n: sorted(ps) for n, ps in names.items() if len(ps) > 1}
    assert not repeated, repeated


def test_presets_import_only_the_config_and_no_torch():
    """``nbsrc.presets`` loads, lists and describes presets: it imports the config layer and nothing
    else of nbsrc (running a preset is :mod:`nbsrc.paper.reproduce`'s), and importing it loads no torch."""
    assert edges()["nbsrc.presets"] <= {"nbsrc.config", "nbsrc.errors"}, edges()["nbsrc.presets"]
    script = ("import sys, nbsrc.presets\n"
              "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('nbsrc.')))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['nbsrc.config', 'nbsrc.errors', 'nbsrc.presets']", proc.stdout


def test_widgets_are_the_top_and_define_only_what_they_export():
    """No nbsrc module imports :mod:`nbsrc.widgets`, and every name it exports is defined there (the
    logic it shows lives in nbsrc.runlist, nbsrc.retrieval and nbsrc.analysis, imported from there)."""
    importers = sorted(m for m, targets in edges().items() if "nbsrc.widgets" in targets)
    assert not importers, importers
    tree = ast.parse(MODULES["nbsrc.widgets"].read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    exported = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets))
    assert set(exported) <= defined, sorted(set(exported) - defined)


def test_every_module_imports_on_its_own():
    """Each module imported first, in a process where no other nbsrc module was imported before it
    (the nbsrc modules are dropped from ``sys.modules`` between imports; third-party ones stay)."""
    script = (
        "import importlib, sys, traceback\n"
        f"mods = {sorted(MODULES)!r}\n"
        "failed = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k == 'nbsrc' or k.startswith('nbsrc.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
