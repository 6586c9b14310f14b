"""The import structure, read from the sources with ``ast`` (nothing is imported, no torch, no Ray):
every ``import`` of orchestrator/, workloads/, benchmarks/ and tests/, those inside functions
included, checked against three rules of issue 22 and shared DESIGN.md:

(a) no module imports another module's private name (``from orchestrator.x import _y``): a name
    another module needs is public;
(b) no import cycle among the project's modules (a lazy import inside a function counts: it is an
    arrow all the same);
(c) the floors: workloads imports neither orchestrator, ray, optuna nor mlflow; orchestrator never
    imports benchmarks or tests.

Each test lists everything it finds, so that one run shows every offender."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "workloads", "benchmarks", "tests")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of the four top-level folders, by dotted name (``orchestrator.runs``)."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = project_modules()


def imports(path: Path) -> list[tuple[int, str, str | None]]:
    """Every import of a file, at any depth: (line, module, name); name is None for ``import m``.
    Relative imports are resolved against the file's package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([mod] if mod else []))
            out += [(node.lineno, mod, a.name) for a in node.names]
    return out


def target(mod: str, name: str | None) -> str | None:
    """The project module an import reaches: ``from orchestrator import psychometric`` reaches
    ``orchestrator.psychometric``, ``from orchestrator.runs import SCHEMA`` ``orchestrator.runs``;
    None outside the project."""
    if name and f"{mod}.{name}" in MODULES:
        return f"{mod}.{name}"
    parts = mod.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for _, mod, name in imports(path):
            t = target(mod, name)
            if t and t != m and not m.startswith(t + "."):  # a package's own __init__ is not an arrow up
                edges[m].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_sources_are_found():
    assert {"orchestrator.runs", "orchestrator.tables", "orchestrator.writers", "orchestrator.figures",
            "orchestrator.forensics", "orchestrator.report", "workloads.trial", "tests.test_layers"} <= set(MODULES)
    assert target("orchestrator", "psychometric") == "orchestrator.psychometric"
    assert target("orchestrator.runs", "SCHEMA") == "orchestrator.runs"
    assert target("numpy", None) is None
    assert "orchestrator.boundary_config" in graph()["orchestrator.tables"]  # a lazy import inside a function counts


def test_no_module_imports_another_modules_private_name():
    found = []
    for m, path in MODULES.items():
        for line, mod, name in imports(path):
            if name and target(mod, name) and name.startswith("_") and not name.startswith("__") \
                    and f"{mod}.{name}" not in MODULES:
                found.append(f"{path.relative_to(ROOT)}:{line}: from {mod} import {name}")
    assert not found, "private names imported from another module:\n" + "\n".join(found)


def test_no_import_cycle_among_project_modules():
    found = cycles(graph())
    assert not found, "import cycles (lazy imports included):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_floors_hold():
    """workloads is the ground floor (pure PyTorch: no orchestrator, Ray, Optuna or MLflow);
    orchestrator stands on it and never reaches up into benchmarks or tests."""
    forbidden = {"workloads": ("orchestrator", "ray", "optuna", "mlflow"), "orchestrator": ("benchmarks", "tests")}
    found = []
    for m, path in MODULES.items():
        banned = forbidden.get(m.split(".")[0], ())
        for line, mod, _ in imports(path):
            if mod.split(".")[0] in banned:
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {mod}")
    assert not found, "imports across a floor:\n" + "\n".join(found)


def test_the_analysis_layers_stack_runs_then_tables_and_figures_then_forensics_and_report():
    """The reading layer imports no analysis module above it; writers import no project module;
    forensics stands on runs and writers; nothing below report imports it (DESIGN.md, Style)."""
    edges = graph()
    analysis = {f"orchestrator.{m}" for m in ("runs", "writers", "tables", "figures", "forensics", "report")}
    assert not edges["orchestrator.writers"] & (analysis | {"orchestrator.mlflow_store"})
    assert not edges["orchestrator.runs"] & analysis
    assert edges["orchestrator.forensics"] & analysis <= {"orchestrator.runs", "orchestrator.writers"}
    assert not edges["orchestrator.tables"] & {"orchestrator.figures", "orchestrator.forensics", "orchestrator.report"}
    assert not edges["orchestrator.figures"] & {"orchestrator.forensics", "orchestrator.report"}
    for low in ("orchestrator.boundary", "orchestrator.sweep", "orchestrator.tracking", "orchestrator.mlflow_store"):
        assert not edges[low] & analysis, f"{low} imports an analysis layer: {sorted(edges[low] & analysis)}"
