"""The packages keep to their roles: the imports are read from the source with ``ast``.

- ``shared/`` (what both sides agree on, and the ML core) imports neither ``server`` nor ``client``;
- ``client/`` (the hospital) never imports ``server``;
- ``server/`` (the consortium) imports ``client`` only in ``server/local/``, the tools that run a
  whole consortium on one machine (demo, simulation, local deployment, baselines, the root CLI);
- every module of ``shared/`` is used by both sides, directly or through other shared modules;
- ``shared/protocol.py`` loads neither torch nor Flower (a ClientApp imports it for every message).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "client", "server")


def module_name(path: Path) -> str:
    """``server/local/demo.py`` -> ``server.local.demo``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> Iterator[str]:
    """Absolute module names ``path`` imports (at any depth of the file: lazy imports count)."""
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield ".".join([*base, node.module] if node.module else base)
            elif node.module:
                yield node.module
                yield from (f"{node.module}.{alias.name}" for alias in node.names)


def project_graph() -> dict[str, set[str]]:
    """Each project module and the project modules it imports (a submodule imports its packages)."""
    files = [f for top in PACKAGES for f in (REPO / top).rglob("*.py")]
    modules = {module_name(f): f for f in files}

    def with_packages(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}

    return {
        name: {p for m in imported_modules(path) for p in with_packages(m) if p in modules and p != name}
        for name, path in modules.items()
    }


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that run against the roles."""
    found = []
    for module, imports in sorted(graph.items()):
        top = module.split(".")[0]
        for target in sorted(imports):
            root = target.split(".")[0]
            local_tool = module == "server.local" or module.startswith("server.local.")
            if (
                (top == "shared" and root in ("server", "client"))
                or (top == "client" and root == "server")
                or (top == "server" and root == "client" and not local_tool)
            ):
                found.append(f"{module} imports {target}")
    return found


def test_no_import_runs_against_the_roles() -> None:
    # Prepare / Execute
    found = violations(project_graph())

    # Assert
    assert found == []


@pytest.mark.parametrize(
    ("module", "imports", "expected"),
    [
        ("shared.config", {"server.app"}, "shared.config imports server.app"),
        ("shared.tasks", {"client.site"}, "shared.tasks imports client.site"),
        ("client.app", {"server.strategy"}, "client.app imports server.strategy"),
        ("server.app", {"client.backbone_mod"}, "server.app imports client.backbone_mod"),
    ],
)
def test_the_check_catches_each_kind_of_violation(module: str, imports: set[str], expected: str) -> None:
    # Prepare: a graph with one wrong edge; the consortium's local tools may import the client
    graph = {module: imports, "server.local.demo": {"client.policy"}}

    # Execute / Assert
    assert violations(graph) == [expected]


def test_every_shared_module_serves_both_sides() -> None:
    # Prepare
    graph = project_graph()
    shared = {m for m in graph if m.split(".")[0] == "shared"}

    # Execute: follow imports from each side through shared modules
    def reached_from(side: str) -> set[str]:
        seen: set[str] = set()
        frontier = [t for m, ts in graph.items() if m.split(".")[0] == side for t in ts if t in shared]
        while frontier:
            current = frontier.pop()
            if current not in seen:
                seen.add(current)
                frontier.extend(t for t in graph[current] if t in shared)
        return seen

    one_sided = sorted(m for m in shared - {"shared"} if not (m in reached_from("server") and m in reached_from("client")))

    # Assert
    assert one_sided == []


def test_the_protocol_loads_neither_torch_nor_flower() -> None:
    # Prepare
    code = "import sys, shared.protocol; print(sorted(m for m in ('torch', 'flwr', 'numpy') if m in sys.modules))"

    # Execute
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)

    # Assert
    assert loaded.stdout.strip() == "[]"
