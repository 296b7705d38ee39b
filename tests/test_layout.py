"""The direction of imports (DESIGN.md): ``pipelines -> ranker -> features``, ``serving ->
features``; no module of ``pipelines`` imports one that imports it back. Read from the source
(every import, also those inside functions), so a new edge fails here before it bites."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("features", "ranker", "pipelines", "serving")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from a import b`` counts ``a.b`` when
    that is a module of the project, else ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return found


MODULES = {module_name(p) for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
GRAPH = {module_name(p): imports(p) for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("features", {"ranker", "pipelines", "serving"}),
        ("ranker", {"pipelines", "serving"}),
        ("serving", {"ranker", "pipelines", "torch", "lightning"}),
    ],
)
def test_imports_point_one_way(package: str, forbidden: set[str]) -> None:
    wrong = {
        f"{module} imports {name}"
        for module, names in GRAPH.items()
        if top(module) == package
        for name in names
        if top(name) in forbidden
    }
    assert not wrong, sorted(wrong)


def test_only_the_datamodule_of_features_imports_torch() -> None:
    heavy = {"torch", "lightning"}
    users = {
        m for m, names in GRAPH.items() if top(m) == "features" and heavy & set(map(top, names))
    }
    assert users == {"features.datamodule"}


def test_no_module_of_pipelines_imports_one_that_imports_it_back() -> None:
    edges = {
        module: {n for n in names if n in MODULES and top(n) == "pipelines" and n != module}
        for module, names in GRAPH.items()
        if top(module) == "pipelines"
    }

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    circles = sorted(m for m in edges if m in reaches(m))
    assert not circles, f"modules on an import circle: {circles}"
