"""The house's layers hold: the domain and the storage adapters know no Flight, and no module imports
in a circle (issue 12)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "flight_server"
# everything outside the transport, the command line and the test helpers
DOMAIN = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
    if not {"transport", "cli", "testing", "_vendor", "__pycache__"} & set(p.relative_to(PACKAGE).parts)
)


@pytest.mark.parametrize("module", DOMAIN)
def test_the_domain_does_not_import_flight_even_indirectly(module: str) -> None:
    probe = f"import sys, {module}; print(sorted(m for m in sys.modules if m in ('pyarrow.flight', 'pyarrow._flight')))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"{module} reaches Flight"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of this repository that ``path`` imports (at module level or in functions; not the
    ``if TYPE_CHECKING:`` ones, which never run). ``from pkg import sub`` is an edge to ``pkg.sub``."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for body in node.body for n in ast.walk(body)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs if len(subs) == len(node.names) else subs | {node.module}
    return found & modules


def test_no_module_imports_in_a_circle() -> None:
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for root in ("flight_server", "client") for p in (REPO / root).rglob("*.py")
               if "_vendor" not in p.parts and "__pycache__" not in p.parts}
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
