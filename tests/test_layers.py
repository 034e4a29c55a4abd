"""The house's layers hold: the domain and the storage adapters know no Flight, each package imports only the
layers under it, and no module imports in a circle (issues 12 and 23). Every edge counts: module level, inside
functions, and under ``if TYPE_CHECKING:`` (a type-only edge is still a dependency a reader must follow)."""

from __future__ import annotations

import ast
import json
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


# Each module is imported in a process of its own that has imported nothing of this repository. One
# interpreter imports the heavy libraries the domain uses (checked not to load Flight themselves) and
# forks a child per module: a fresh interpreter each (the old way) spent ~1 s per module importing the
# same libraries again.
_PROBE = """
import json, os, sys, traceback
FLIGHT = ("pyarrow.flight", "pyarrow._flight")
for lib in ("pyarrow", "pandas", "duckdb", "sqlglot", "yaml", "dlt"):
    __import__(lib)
preloaded = sorted(m for m in sys.modules if m in FLIGHT)
for module in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            __import__(module)
            answer = {"ok": True, "flight": sorted(m for m in sys.modules if m in FLIGHT)}
        except BaseException:
            answer = {"ok": False, "error": traceback.format_exc()[-2000:]}
        os.write(write, json.dumps(answer).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    answer = json.loads(data) if data else {"ok": False, "error": "the probe process died"}
    print(json.dumps({"module": module, "preloaded": preloaded, **answer}), flush=True)
"""


@pytest.fixture(scope="module")
def flight_reached() -> dict[str, dict]:
    """What importing each domain module loads of Flight, each in a process of its own."""
    result = subprocess.run([sys.executable, "-c", _PROBE, *DOMAIN], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {a["module"]: a for a in answers}


@pytest.mark.parametrize("module", DOMAIN)
def test_the_domain_does_not_import_flight_even_indirectly(module: str, flight_reached: dict[str, dict]) -> None:
    answer = flight_reached[module]
    assert answer["preloaded"] == [], f"a library the domain imports loads Flight: {answer['preloaded']}"
    assert answer["ok"], answer["error"]
    assert answer["flight"] == [], f"{module} reaches Flight"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of this repository that ``path`` imports (at module level, in functions, under ``if TYPE_CHECKING:``).
    ``from pkg import sub`` is an edge to ``pkg.sub``."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs if len(subs) == len(node.names) else subs | {node.module}
    return found & modules


def _graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for root in ("flight_server", "client") for p in (REPO / root).rglob("*.py")
               if "_vendor" not in p.parts and "__pycache__" not in p.parts}
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


# what each package of the server may import (beyond itself and the standard/third-party libraries); the server's
# edges into client/ are the wire format and the shared value types (README, Layout). cli/ and testing/ are the
# composition roots: they build servers and may reach everything.
_SHARED_WITH_CLIENTS = ("client.protocol", "client.load_info")
LAYERS: dict[str, tuple[str, ...]] = {
    "flight_server.domain": _SHARED_WITH_CLIENTS,
    "flight_server.storage": ("flight_server.domain",),
    "flight_server.transport": ("flight_server.domain", "flight_server._vendor", "client", *_SHARED_WITH_CLIENTS),
}
# the domain's floor: the modules everything else stands on (errors, quoting, masking, and the project file:
# config with its dlt+ reader and credential hashing) import nothing of the project but each other
FLOOR = {"flight_server.domain.errors", "flight_server.domain.identifiers", "flight_server.domain.masking",
         "flight_server.domain.config", "flight_server.domain.dltplus", "flight_server.domain.credentials"}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_each_package_imports_only_the_layers_under_it() -> None:
    wrong = sorted(f"{module} -> {target}" for module, targets in _graph().items() for package, allowed in LAYERS.items()
                   if _within(module, (package,)) for target in targets
                   if not _within(target, (package, *allowed)) and target not in allowed)
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)
    floor = sorted(f"{module} -> {target}" for module, targets in _graph().items() if module in FLOOR
                   for target in targets if target not in FLOOR)
    assert not floor, "the domain's floor imports above it:\n" + "\n".join(floor)


def test_no_module_imports_in_a_circle() -> None:
    graph = _graph()
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
