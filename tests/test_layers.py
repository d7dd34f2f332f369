"""The package's layers import in one direction only: a wrong import fails here.

Every ``import`` in ``src/llm_service`` counts, at module level or inside a function (a lazy
import is still a dependency), except those under ``if TYPE_CHECKING:``.

    cli (llm_service) ──> wiring ──> engine ──> types, errors, log
      │                     └──> settings ──> types
      ├──> server ──> engine, api, wiring
      ├──> client ──> api, settings, flags
      └──> gateway ──> client
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "llm_service"

# What each part of the package may import of the package itself (besides its own modules).
LEAVES = {"llm_service.types", "llm_service.errors", "llm_service.log"}
ALLOWED: dict[str, set[str]] = {
    "llm_service.log": set(),
    "llm_service.errors": {"llm_service.log"},
    "llm_service.types": {"llm_service.errors"},
    "llm_service.settings": LEAVES,
    "llm_service.default_model": LEAVES,
    "llm_service.certs": LEAVES,
    "llm_service.flags": LEAVES | {"llm_service.settings", "llm_service.client"},
    "llm_service.api": LEAVES,
    "llm_service.engine": LEAVES,
    "llm_service.wiring": LEAVES
    | {"llm_service.engine", "llm_service.settings", "llm_service.default_model"},
    "llm_service.server": LEAVES
    | {"llm_service", "llm_service.api", "llm_service.engine", "llm_service.settings"}
    | {"llm_service.wiring"},
    "llm_service.client": LEAVES | {"llm_service.api", "llm_service.settings", "llm_service.flags"},
    "llm_service.gateway": LEAVES
    | {"llm_service", "llm_service.client", "llm_service.settings", "llm_service.flags"},
}
# The top-level command dispatches to every part (lazily, so that each starts fast).
TOP = {"llm_service.cli", "llm_service.__main__", "llm_service.__init__"}

# Third-party packages only some parts may import.
ONLY_IN = {
    "llama_cpp": {"llm_service.engine.llama"},
    "numpy": {"llm_service.engine.llama"},
    "grpc": {"llm_service.server", "llm_service.client", "llm_service.api"},
    "grpc_health": {"llm_service.server", "llm_service.client"},
    "grpc_reflection": {"llm_service.server"},
    # The web framework: the gateway's only.
    "fastapi": {"llm_service.gateway"},
    "starlette": {"llm_service.gateway"},
    "uvicorn": {"llm_service.gateway"},
    # An HTTP toolkit: the gateway's client for replica health checks, and the server's plain
    # HTTP port (probes, metrics).
    "aiohttp": {"llm_service.gateway", "llm_service.server.http"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """The modules ``path`` imports (absolute names), leaving out ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def part_of(module: str) -> str:
    """The part a module belongs to: its entry in ALLOWED (the longest prefix)."""
    matches = [p for p in ALLOWED if module == p or module.startswith(p + ".")]
    return max(matches, key=len) if matches else module


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if not p.name.endswith(("_pb2.py", "_grpc.py")))


def test_every_module_belongs_to_a_part() -> None:
    orphans = [
        module_name(p)
        for p in MODULES
        if module_name(p) not in TOP and part_of(module_name(p)) not in ALLOWED
    ]
    assert orphans == [], "add these modules to a part in tests/test_layers.py"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_go_one_way(path: Path) -> None:
    module = module_name(path)
    if module in TOP:
        return
    part = part_of(module)
    wrong = []
    for name in sorted(imports(path)):
        top = name.split(".")[0]
        if top == "llm_service":
            target = part_of(name) if name != "llm_service" else "llm_service"
            if target != part and target not in ALLOWED[part]:
                wrong.append(name)
        elif top in ONLY_IN and not any(
            module == allowed or module.startswith(allowed + ".") for allowed in ONLY_IN[top]
        ):
            wrong.append(name)
    assert wrong == [], f"{module} ({part}) may not import {wrong}"
