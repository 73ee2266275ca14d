"""Architecture checks read from the source with `ast`: nothing is imported and no model is loaded (< 1 s).

    .venv/bin/python -m pytest -q tests/test_architecture.py

What is checked (every check also looks inside functions and under `if TYPE_CHECKING:`):
  (a) no module of `rac` imports Prefect or the Prefect layer (`rac_prefect`, or `flows` / `tasks`);
  (b) the module import graph of `rac` + `rac_prefect` has no cycle (the failure names the modules and lines);
  (c) every import between units follows the allowed-dependency table `ALLOWED` below;
  (d) every package folder has an `__init__.py` with a one-line summary docstring, and is installed;
  (e) no new module file name is shared by two folders of `rac/` (the known ones are listed).

The import graph: one node per module (`rac.pruners` is rac/pruners/__init__.py), one edge per module an
`import` / `from ... import` statement names, with relative imports resolved against the installed names
(pyproject `package-dir`: flows/ is `rac_prefect.flows`, tasks/ is `rac_prefect.tasks`).
`from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg`. The implicit import of
a parent package (importing `rac.pruners.base` first runs rac/pruners/__init__.py) is not an edge: every
package whose `__init__` re-exports its submodules would otherwise be a cycle.
Imports inside functions and under TYPE_CHECKING count like top-level ones: they are dependencies all the
same (a late import only hides a cycle from the import system, a TYPE_CHECKING one from the runtime), and
the design goal is no cycle at all, and there is none.

docs/architecture_diagram.py draws docs/architecture.png from `unit_graph()`.
"""

from __future__ import annotations

import ast
import functools
import tomllib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTERNAL = ("rac", "rac_prefect")  # top-level import names of this project
PREFECT_LAYER_NAMES = ("rac_prefect", "flows", "tasks")  # `flows` / `tasks`: the folders' un-installed names

# ---------------------------------------------------------------- units and the allowed-dependency table
# A unit is a group of modules given by name prefixes (the longest matching prefix wins; "rac" itself
# matches only rac/__init__.py). The foundation units import nothing from rac: anyone may import them.
UNITS: dict[str, tuple[str, ...]] = {
    "rac (core)": ("rac", "rac.config", "rac.dtypes"),  # __version__, StageConfig + hashing, dtype table
    "rac.store": ("rac.store",),  # rac.store.artifacts: artifact refs, the one atomic write
    "rac.data.segments": ("rac.data.segments",),  # segment labels + calibration Parquet schema
    "rac.models.loading": ("rac.models.loading",),  # the one from_pretrained door (trust_remote_code explicit)
    "rac.store.index": ("rac.store.index",),  # the DuckDB index
    "rac.models": ("rac.models",),
    "rac.pruners": ("rac.pruners",),
    "rac.data": ("rac.data",),
    "rac.engine": ("rac.engine",),
    "rac.eval": ("rac.eval",),
    "rac.runs": ("rac.runs",),
    "rac.reporting": ("rac.reporting",),
    "rac.api": ("rac.api",),  # the notebook door: calibrate / prune / evaluate / harness over rac.runs
    "rac_prefect.tasks": ("rac_prefect.tasks",),
    "rac_prefect.flows": ("rac_prefect.flows",),
}
FOUNDATION = frozenset({"rac (core)", "rac.store", "rac.data.segments", "rac.models.loading"})
_RAC_UNITS = frozenset(u for u in UNITS if u.startswith("rac ") or u.startswith("rac."))

# unit -> the other units it may import (derived from the code as reorganised; tighten, do not loosen lightly)
ALLOWED: dict[str, frozenset[str]] = {
    "rac (core)": frozenset(),
    "rac.store": frozenset(),
    "rac.data.segments": frozenset(),
    "rac.models.loading": frozenset(),
    "rac.store.index": frozenset({"rac.store"}),
    # the bottom: pure math, model plumbing and data know nothing of each other, the engine, runs or the index
    "rac.models": FOUNDATION,
    "rac.pruners": FOUNDATION,
    "rac.data": FOUNDATION,
    # the engine streams models and calls pruners; it reads calibration Parquet through rac.data.segments
    # only, never the generation stack of rac.data
    "rac.engine": FOUNDATION | {"rac.models", "rac.pruners"},
    "rac.eval": FOUNDATION | {"rac.data", "rac.models", "rac.pruners"},
    # runs compose the stage configs and call every library entry point; the index is theirs to write
    "rac.runs": FOUNDATION | {"rac.store.index", "rac.models", "rac.pruners", "rac.data", "rac.engine",
                              "rac.eval"},
    # reports read the index and the work-dir layout (rac.runs.workdir) and reuse eval's intervals;
    # rac.runs never imports rac.reporting (the report is a Prefect task over write_report, not a stage)
    "rac.reporting": FOUNDATION | {"rac.store.index", "rac.eval", "rac.runs", "rac.models"},
    # the Python API sits on top of the library: it runs the rac.runs steps and finds a run's pruned models
    # like `rac export` (rac.reporting.export); nothing in rac imports it, only the CLI (rac_prefect) does
    "rac.api": FOUNDATION | {"rac.store.index", "rac.models", "rac.pruners", "rac.data", "rac.engine", "rac.eval",
                             "rac.runs", "rac.reporting"},
    # the Prefect layer: flows -> tasks -> rac, never the other way
    "rac_prefect.tasks": _RAC_UNITS,
    "rac_prefect.flows": _RAC_UNITS | {"rac_prefect.tasks"},
}

# third-party top-level imports a unit must not use (besides Prefect, which all of rac must not use)
FORBIDDEN_EXTERNAL: dict[str, frozenset[str]] = {
    "rac.pruners": frozenset({"transformers", "vllm", "datasets", "duckdb", "pyarrow"}),  # tensors in, tensors out
    "rac.engine": frozenset({"vllm", "datasets", "duckdb"}),  # no generation stack, no index
    "rac.models": frozenset({"vllm", "datasets", "duckdb"}),
    "rac.store": frozenset({"torch", "transformers", "vllm"}),  # `rac status` / `rac sql` stay light
    "rac.store.index": frozenset({"torch", "transformers", "vllm"}),
}

# module file names that two folders of rac/ share on purpose (reported, not failed)
KNOWN_SHARED_NAMES: dict[str, frozenset[str]] = {}


# ---------------------------------------------------------------- the import graph
@dataclass(frozen=True)
class Import:
    """One imported module of one import statement."""

    src: str  # importing module
    target: str  # absolute dotted name as written (relative imports resolved)
    dst: str | None  # the project module it resolves to; None for third-party or unresolved names
    line: int
    context: str  # "module" | "function" | "type_checking"
    path: str  # importing file, relative to the repo root

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def package_dirs() -> dict[str, Path]:
    """Installed package name -> its folder, from pyproject ([tool.setuptools] packages + package-dir)."""
    st = _pyproject()["tool"]["setuptools"]
    mapped = st.get("package-dir", {})
    out = {}
    for pkg in st["packages"]:
        base = next((p for p in sorted(mapped, key=len, reverse=True) if pkg == p or pkg.startswith(p + ".")), None)
        rel = mapped[base] + pkg[len(base):].replace(".", "/") if base else pkg.replace(".", "/")
        out[pkg] = ROOT / rel
    return out


def module_files() -> dict[str, Path]:
    """Every project module (installed dotted name) -> its source file."""
    mods: dict[str, Path] = {}
    for pkg, folder in package_dirs().items():
        for f in sorted(folder.glob("*.py")):
            mods[pkg if f.name == "__init__.py" else f"{pkg}.{f.stem}"] = f
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(module: str, is_pkg: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    parts = (module if is_pkg else module.rpartition(".")[0]).split(".")
    if level - 1 >= len(parts):
        raise ValueError(f"{module}: relative import beyond the top-level package (level {level})")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_pkg: bool, known: Iterable[str], path: str) -> None:
        self.module, self.is_pkg, self.known, self.path = module, is_pkg, set(known), path
        self.context = ["module"]
        self.found: list[Import] = []

    def _scoped(self, node: ast.AST, context: str) -> None:
        self.context.append(context)
        self.generic_visit(node)
        self.context.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scoped(node, "function")

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._scoped(node, "function")

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._scoped(node, "function")

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self.context.append("type_checking" if self.context[-1] == "module" else self.context[-1])
        for stmt in node.body:
            self.visit(stmt)
        self.context.pop()
        for stmt in node.orelse:
            self.visit(stmt)

    def _add(self, target: str, dst: str | None, line: int) -> None:
        self.found.append(Import(self.module, target, dst, line, self.context[-1], self.path))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, alias.name if alias.name in self.known else None, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _absolute(self.module, self.is_pkg, node.level, node.module)
        targets = {}  # one Import per module a statement names (`from m import a, b` is one edge to m)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            targets.setdefault(*((sub, sub) if sub in self.known else (base, base if base in self.known else None)))
        for target, dst in targets.items():
            self._add(target, dst, node.lineno)


def imports_of(source: str, module: str, is_pkg: bool, known: Iterable[str], path: str = "<src>") -> list[Import]:
    """The imports of one module's source, with their context (module level, function, TYPE_CHECKING)."""
    collector = _Collector(module, is_pkg, known, path)
    collector.visit(ast.parse(source, filename=path))
    return collector.found


@functools.lru_cache(maxsize=1)
def all_imports() -> tuple[Import, ...]:
    mods = module_files()
    out: list[Import] = []
    for mod, f in mods.items():
        out += imports_of(f.read_text(), mod, f.name == "__init__.py", mods, str(f.relative_to(ROOT)))
    return tuple(out)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (every module is a node)."""
    graph: dict[str, set[str]] = {m: set() for m in module_files()}
    for imp in all_imports():
        if imp.dst is not None:
            graph[imp.src].add(imp.dst)
    return graph


def unit_of(module: str) -> str | None:
    """The unit of the allowed-dependency table a module belongs to (None: in no unit)."""
    best, best_len = None, -1
    for unit, prefixes in UNITS.items():
        for p in prefixes:
            hit = module == p or (p != "rac" and module.startswith(p + "."))
            if hit and len(p) > best_len:
                best, best_len = unit, len(p)
    return best


def unit_graph() -> dict[tuple[str, str], int]:
    """(importer unit, imported unit) -> number of module-level edges behind it (units of different names)."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for src, dsts in import_graph().items():
        for dst in dsts:
            a, b = unit_of(src), unit_of(dst)
            if a is not None and b is not None and a != b:
                counts[(a, b)] += 1
    return dict(counts)


def unit_modules() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {u: [] for u in UNITS}
    for mod in module_files():
        unit = unit_of(mod)
        if unit is not None:
            out[unit].append(mod)
    return out


def cycle_components(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components that hold a cycle (Tarjan), each sorted, in sorted order."""
    adj = {n: sorted(set(vs)) for n, vs in graph.items()}
    for vs in list(adj.values()):
        for v in vs:
            adj.setdefault(v, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in adj[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in adj[v]:
                sccs.append(sorted(comp))

    for v in sorted(adj):
        if v not in index:
            strong(v)
    return sorted(sccs)


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One shortest cycle [a, b, ..., a] per component of `cycle_components`."""
    adj = {n: sorted(set(vs)) for n, vs in graph.items()}
    return [_cycle_in(adj, set(c)) for c in cycle_components(graph)]


def _cycle_in(adj: Mapping[str, list[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the smallest node of a strongly connected component (breadth-first)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier, seen = [start], {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in adj.get(v, []):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in comp and w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in component {sorted(comp)}")


def describe_cycles(graph: Mapping[str, Iterable[str]]) -> str:
    """Every cyclic component: its modules, one cycle through it, the file:line of each import on that cycle."""
    by_edge = defaultdict(list)
    for imp in all_imports():
        by_edge[(imp.src, imp.dst)].append(f"{imp.where} ({imp.context})")
    out = []
    for comp, cycle in zip(cycle_components(graph), find_cycles(graph), strict=True):
        out.append(f"modules on a cycle: {', '.join(comp)}\n  e.g. " + " -> ".join(cycle))
        out += [f"    {a} -> {b}: {', '.join(by_edge.get((a, b), ['?']))}" for a, b in zip(cycle, cycle[1:], strict=False)]
    return "\n".join(out)


# ---------------------------------------------------------------- the checker checks itself
@pytest.fixture(autouse=True)
def _seed_rngs() -> None:
    """Overrides conftest's RNG seeding here: these checks read source text, and importing torch for it
    would be most of this file's run time."""


def test_cycle_detector_finds_hand_made_cycles() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"x": {"x"}, "y": set()}) == [["x", "x"]]
    two = find_cycles({"a": {"b"}, "b": {"a"}, "p": {"q"}, "q": {"r"}, "r": {"p", "a"}})
    assert two == [["a", "b", "a"], ["p", "q", "r", "p"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []  # a diamond is no cycle
    # two cycles sharing a node are one component: every module of it is reported
    assert cycle_components({"a": {"b", "c"}, "b": {"a"}, "c": {"a"}}) == [["a", "b", "c"]]


def test_collector_sees_function_type_checking_and_relative_imports() -> None:
    src = (
        "from typing import TYPE_CHECKING\n"
        "from . import sib\n"
        "from .sib import thing\n"
        "from ..other import helper\n"
        "import pkg.other\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.other import T\n"
        "class C:\n"
        "    import pkg.sub.sib as s\n"
        "def f():\n"
        "    from pkg.sub import late\n"
        "    return late\n"
    )
    known = {"pkg", "pkg.other", "pkg.sub", "pkg.sub.sib", "pkg.sub.mod"}
    got = [(i.target, i.dst, i.context) for i in imports_of(src, "pkg.sub.mod", False, known)]
    assert got == [
        ("typing", None, "module"),
        ("pkg.sub.sib", "pkg.sub.sib", "module"),
        ("pkg.sub.sib", "pkg.sub.sib", "module"),
        ("pkg.other", "pkg.other", "module"),
        ("pkg.other", "pkg.other", "module"),
        ("pkg.other", "pkg.other", "type_checking"),
        ("pkg.sub.sib", "pkg.sub.sib", "module"),
        ("pkg.sub", "pkg.sub", "function"),
    ]
    # a package's own relative import resolves against the package itself
    assert [i.dst for i in imports_of("from .mod import x\n", "pkg.sub", True, known)] == ["pkg.sub.mod"]


def test_the_graph_covers_the_project() -> None:
    mods = module_files()
    assert {"rac", "rac.pruners.sparsegpt", "rac.runs.stages", "rac_prefect.flows.cli",
            "rac_prefect.tasks.stages"} <= set(mods)
    graph = import_graph()
    assert "rac.pruners" in graph["rac.engine.prune_step"]
    assert "rac.runs.stages" in graph["rac_prefect.tasks.stages"]  # `from rac.runs import stages as steps`
    assert "rac_prefect.flows.prune" in graph["rac_prefect.flows.cli"]  # a function-level import


# ---------------------------------------------------------------- (a) rac never imports the Prefect layer
def test_rac_never_imports_prefect_or_the_prefect_layer() -> None:
    bad = [f"{i.where}: {i.src} imports {i.target} ({i.context})" for i in all_imports()
           if unit_of(i.src) in _RAC_UNITS
           and (i.target.split(".")[0] in PREFECT_LAYER_NAMES or i.target.split(".")[0].startswith("prefect"))]
    assert not bad, "rac/ must not import Prefect or rac_prefect (flows/, tasks/):\n" + "\n".join(bad)


def test_project_imports_resolve_to_project_modules() -> None:
    """`rac.*` / `rac_prefect.*` names that are no module (a stale path after a move), or the Prefect
    layer under its folder names (`flows.x`, `tasks.x`: not importable once installed)."""
    bad = [f"{i.where}: {i.src} imports {i.target}" for i in all_imports()
           if i.dst is None and i.target.split(".")[0] in (*INTERNAL, "flows", "tasks")]
    assert not bad, "imports of no project module:\n" + "\n".join(bad)


# ---------------------------------------------------------------- (b) no import cycle
def test_no_import_cycle() -> None:
    graph = import_graph()
    cyclic = cycle_components(graph)
    assert not cyclic, "import cycles:\n" + describe_cycles(graph)


def test_unit_graph_has_no_cycle() -> None:
    cycles = find_cycles({a: {b for (x, b) in unit_graph() if x == a} for a in UNITS})
    assert not cycles, f"cycles between units: {cycles}"


# ---------------------------------------------------------------- (c) layering
def test_allowed_table_is_a_dag_over_known_units() -> None:
    assert set(ALLOWED) == set(UNITS)
    assert all(deps <= set(UNITS) for deps in ALLOWED.values())
    assert find_cycles(ALLOWED) == [], "the allowed-dependency table itself has a cycle"
    for unit in FOUNDATION:
        assert ALLOWED[unit] == frozenset(), f"foundation unit {unit} may not import other units"


def test_every_module_is_in_a_unit() -> None:
    missing = sorted(m for m in module_files() if unit_of(m) is None)
    assert not missing, f"modules in no unit of UNITS (add them to the table): {missing}"


def test_imports_follow_the_allowed_dependency_table() -> None:
    bad = []
    for i in all_imports():
        if i.dst is None:
            continue
        a, b = unit_of(i.src), unit_of(i.dst)
        if a is not None and b is not None and a != b and b not in ALLOWED[a]:
            bad.append(f"{i.where}: {i.src} ({a}) imports {i.dst} ({b}) [{i.context}]")
    assert not bad, "imports against the allowed-dependency table:\n" + "\n".join(bad)


def test_units_avoid_forbidden_third_party_packages() -> None:
    bad = [f"{i.where}: {i.src} imports {i.target}" for i in all_imports()
           if i.dst is None and i.target.split(".")[0] in FORBIDDEN_EXTERNAL.get(unit_of(i.src) or "", ())]
    assert not bad, "third-party imports a unit must not use:\n" + "\n".join(bad)


# ---------------------------------------------------------------- (d) package folders
def _package_folders() -> list[Path]:
    roots = [ROOT / "rac", *(d for p, d in package_dirs().items() if p.startswith("rac_prefect."))]
    out: list[Path] = []
    for root in roots:
        out += [root, *sorted(d for d in root.rglob("*") if d.is_dir() and "__pycache__" not in d.parts
                              and not any(part.startswith(".") for part in d.relative_to(root).parts))]
    return sorted(set(out))


def test_every_package_folder_has_a_one_line_summary_docstring() -> None:
    bad = []
    for folder in _package_folders():
        init = folder / "__init__.py"
        rel = folder.relative_to(ROOT)
        if not init.is_file():
            bad.append(f"{rel}/: no __init__.py")
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        lines = (doc or "").splitlines()
        if not lines or not lines[0].strip():
            bad.append(f"{rel}/__init__.py: no docstring")
        elif len(lines) > 1 and lines[1].strip():
            bad.append(f"{rel}/__init__.py: the docstring's summary is not one line (line 2 must be blank)")
    assert not bad, "\n".join(bad)


def test_every_package_folder_is_installed() -> None:
    """[tool.setuptools] packages lists every package explicitly: a folder left out is not in the wheel."""
    listed = {d.resolve() for d in package_dirs().values()}
    missing = [str(f.relative_to(ROOT)) for f in _package_folders() if f.resolve() not in listed]
    assert not missing, f"package folders not in pyproject [tool.setuptools] packages: {missing}"
    absent = [p for p, d in package_dirs().items() if not (d / "__init__.py").is_file()]
    assert not absent, f"packages in pyproject without a folder: {absent}"


# ---------------------------------------------------------------- (e) confusable module names
def shared_module_names() -> dict[str, set[str]]:
    """Module file names (not __init__.py) that more than one folder of rac/ holds -> those folders."""
    seen: dict[str, set[str]] = defaultdict(set)
    for f in (ROOT / "rac").rglob("*.py"):
        if f.name != "__init__.py" and "__pycache__" not in f.parts:
            seen[f.name].add(str(f.parent.relative_to(ROOT)))
    return {name: folders for name, folders in seen.items() if len(folders) > 1}


def test_no_new_module_name_shared_by_two_rac_folders() -> None:
    new = {name: sorted(folders) for name, folders in shared_module_names().items()
           if not folders <= KNOWN_SHARED_NAMES.get(name, frozenset())}
    assert not new, (f"module names held by two folders of rac/ (rename one, or add it to KNOWN_SHARED_NAMES "
                     f"with the reason): {new}")
