"""Draw docs/architecture.png: the dependency graph of the units of tests/test_architecture.py.

    .venv/bin/python docs/architecture_diagram.py [OUT.png]

The graph is the one the architecture tests check (`unit_graph()`, built with `ast` from the source), so
the picture cannot drift from the code. Rows are layers: a unit sits one row above the highest unit it
imports. Arrows point from the importer to the imported unit; those implied by a longer path are faint.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]

COLOURS = {  # by unit: foundation grey, bottom blue, middle green, runs orange (the API darker), reporting purple, Prefect red
    "rac (core)": "#e0e0e0", "rac.store": "#e0e0e0", "rac.data.segments": "#e0e0e0",
    "rac.store.index": "#c6dbef", "rac.models": "#c6dbef", "rac.pruners": "#c6dbef", "rac.data": "#c6dbef",
    "rac.engine": "#c7e9c0", "rac.eval": "#c7e9c0", "rac.runs": "#fdd0a2", "rac.reporting": "#dadaeb",
    "rac.api": "#fdae6b",
    "rac_prefect.tasks": "#fcbba1", "rac_prefect.flows": "#fcbba1",
}


def checker() -> ModuleType:
    """tests/test_architecture.py, imported as a module (tests/ is no package)."""
    sys.path.insert(0, str(ROOT / "tests"))
    return importlib.import_module("test_architecture")


def levels(units: list[str], edges: set[tuple[str, str]]) -> dict[str, int]:
    """Row of each unit: 0 when it imports no other unit, else one above the highest one it imports."""
    memo: dict[str, int] = {}

    def level(u: str) -> int:
        if u not in memo:
            memo[u] = 1 + max((level(b) for a, b in edges if a == u), default=-1)
        return memo[u]

    return {u: level(u) for u in units}


def reduced(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The edges not implied by a longer path (transitive reduction of a DAG)."""
    succ: dict[str, set[str]] = {}
    for a, b in edges:
        succ.setdefault(a, set()).add(b)

    def reach(u: str, seen: set[str]) -> set[str]:
        for v in succ.get(u, ()):
            if v not in seen:
                seen.add(v)
                reach(v, seen)
        return seen

    return {(a, b) for a, b in edges
            if not any(b in reach(c, {c}) for c in succ.get(a, ()) if c != b)}


def short(unit: str, module: str) -> str:
    if module == "rac":
        return "__init__"
    if unit == "rac (core)" or module.count(".") == unit.count("."):  # single-module units
        return module.rpartition(".")[2] if unit == "rac (core)" else ""
    return module[len(unit) + 1:] if module.startswith(unit + ".") else module.rpartition(".")[2]


def draw(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    arch = checker()
    counts = arch.unit_graph()
    units = list(arch.UNITS)
    edges = set(counts)
    level = levels(units, edges)
    strong = reduced(edges)
    rows: dict[int, list[str]] = {}
    for u in units:
        rows.setdefault(level[u], []).append(u)
    pos: dict[str, tuple[float, float]] = {}
    width = max(len(r) for r in rows.values())
    for lv in sorted(rows):  # order each row by the mean x of what it imports (fewer crossings)
        row = rows[lv]
        if lv > 0:
            row.sort(key=lambda u: sum(pos[b][0] for a, b in edges if a == u) / max(1, sum(a == u for a, _ in edges)))
        for i, u in enumerate(row):  # on the slots of the widest row, centred
            pos[u] = ((i + 0.5 + (width - len(row)) / 2) / width * 10.0, lv * 1.55)
    mods = arch.unit_modules()

    fig, ax = plt.subplots(figsize=(10, 11.5), dpi=90)
    box_w, box_h = 2.3, 0.78
    def spread(dx: float) -> float:  # where on a box's edge an arrow leaves / arrives, by direction
        return max(-0.42, min(0.42, dx * 0.12)) * box_w

    for a, b in sorted(edges, key=lambda e: e in strong):  # faint ones first, underneath
        (xa, ya), (xb, yb) = pos[a], pos[b]
        key = (a, b) in strong
        span = level[a] - level[b]
        rad = 0.0 if span == 1 else (0.3 if xb < xa or (xb == xa and xa < 5) else -0.3)
        ax.add_patch(FancyArrowPatch(
            (xa + spread(xb - xa), ya - box_h / 2), (xb + spread(xa - xb), yb + box_h / 2),
            connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>", mutation_scale=13 if key else 8,
            lw=1.6 if key else 0.6, color="#333333" if key else "#c0c0c0", zorder=2 if key else 1,
            shrinkA=0, shrinkB=1,
        ))
    for u, (x, y) in pos.items():
        ax.add_patch(FancyBboxPatch((x - box_w / 2, y - box_h / 2), box_w, box_h,
                                    boxstyle="round,pad=0.02,rounding_size=0.08", fc=COLOURS.get(u, "white"),
                                    ec="#555555", lw=1.0, zorder=3))
        names = [s for s in (short(u, m) for m in mods[u]) if s and s != "__init__" or u == "rac (core)"]
        detail = textwrap.fill(" ".join(names), 34)
        ax.text(x, y + (0.17 if detail else 0), u, ha="center", va="center", fontsize=10, weight="bold", zorder=4)
        if detail:
            ax.text(x, y - 0.15, detail, ha="center", va="center", fontsize=7, color="#333333", zorder=4)
    ax.text(0.0, max(y for _, y in pos.values()) + 0.75,
            "rac import graph by unit (tests/test_architecture.py: UNITS, ALLOWED); arrow = imports.\n"
            "Dark: direct dependency; grey: also implied by a longer path. Grey boxes: foundation (import nothing).",
            fontsize=8.5, va="bottom", ha="left", color="#333333")
    ax.set_xlim(-0.3, 10.3)
    ax.set_ylim(-0.7, max(y for _, y in pos.values()) + 1.3)
    ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "docs" / "architecture.png"
    print(draw(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
