"""Shared fixtures: a demo project in a temp folder and a real server process over it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from client import Catalog, connect
from flight_server.testing.servers import ServerProcess, make_project


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo project with 500 generated GitHub events loaded into its lake."""
    return make_project(tmp_path_factory.mktemp("demo"), events=500)


@pytest.fixture(scope="session")
def server(demo_project: Path) -> Iterator[ServerProcess]:
    """One server over the demo project for the whole session (read-only tests)."""
    with ServerProcess(demo_project) as proc:
        yield proc
        assert proc.alive, f"the server died during the tests:\n{proc.output()}"


@pytest.fixture()
def catalog(server: ServerProcess) -> Iterator[Catalog]:
    with connect(server.url) as cat:
        yield cat


# --- real backing services (flight_server/testing/services.py): one PostgreSQL and one S3 server per session --------
from flight_server.testing.services import PostgresServer, S3Server, postgres_server, s3_server  # noqa: E402


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL on a free loopback port (password auth over TCP), stopped at session end."""
    yield from postgres_server()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A real S3-compatible server (moto_server) on a free loopback port with one bucket."""
    yield from s3_server()
# --- secured servers (tests/test_auth.py, test_sql_sandbox.py, test_hostile.py) ----------------------
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import pyarrow.flight as flight  # noqa: E402

from tests import security  # noqa: E402


@dataclass
class Secured:
    """A running locked-down server and what a client needs to reach it."""

    proc: ServerProcess
    kind: str  # plain | tls | mtls
    tls: dict[str, Any] = field(default_factory=dict)  # connect() keyword arguments for TLS

    @property
    def url(self) -> str:
        return self.proc.url

    def connect(self, **kwargs: Any) -> Catalog:
        return connect(self.url, **{**self.tls, **kwargs})

    def login(self, user: str = "alice") -> Catalog:
        return self.connect(username=user, password=security.PASSWORDS[user])

    def raw(self, **kwargs: Any) -> flight.FlightClient:
        """A bare pyarrow client (TLS settings applied, no credentials)."""
        tls = {k: Path(v).read_bytes() for k, v in self.tls.items()}
        return flight.FlightClient(self.url, **{**tls, **kwargs})

    def token(self, user: str = "alice") -> str:
        """A bearer token from the Flight handshake (Basic user:password)."""
        client = self.raw()
        try:
            _, value = client.authenticate_basic_token(user, security.PASSWORDS[user])
        finally:
            client.close()
        return value.decode().split(" ", 1)[1]


@pytest.fixture(scope="session")
def secure_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo events in the secure project's lake (github_events_dataset and internal_dataset), loaded once."""
    return security.make_data(tmp_path_factory.mktemp("secure-data"))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> security.Pki:
    return security.make_pki(tmp_path_factory.mktemp("pki"))


def _secured(tmp_path_factory: pytest.TempPathFactory, data: Path, kind: str, pki: security.Pki | None,
             server_extra: str = "") -> Iterator[Secured]:
    project = security.secure_project(tmp_path_factory.mktemp(f"secure-{kind}"), data, server_extra)
    args: list[str] = []
    tls: dict[str, Any] = {}
    if pki is not None:
        args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
        tls = {"tls_root_certs": pki.ca}
        if kind == "mtls":
            args += ["--tls-client-ca", str(pki.ca)]
            tls.update(cert_chain=pki.client_cert, private_key=pki.client_key)
    with ServerProcess(project, *args, env=security.ENV) as proc:
        yield Secured(proc, kind, tls)
        assert proc.alive, f"the {kind} server died during the tests:\n{proc.output()}"


@pytest.fixture(scope="session")
def secure_server(tmp_path_factory: pytest.TempPathFactory, secure_data: Path) -> Iterator[Secured]:
    """The locked-down project over plaintext gRPC (loopback)."""
    yield from _secured(tmp_path_factory, secure_data, "plain", None)


@pytest.fixture(scope="session")
def tls_server(tmp_path_factory: pytest.TempPathFactory, secure_data: Path, pki: security.Pki) -> Iterator[Secured]:
    """The locked-down project over TLS (server certificate from the throwaway CA)."""
    yield from _secured(tmp_path_factory, secure_data, "tls", pki)


@pytest.fixture(scope="session")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, secure_data: Path, pki: security.Pki) -> Iterator[Secured]:
    """The locked-down project over mutual TLS (client certificates required)."""
    yield from _secured(tmp_path_factory, secure_data, "mtls", pki)


@pytest.fixture(params=["plain", "tls"])
def secured(request: pytest.FixtureRequest) -> Secured:
    """Each test using this runs against the plaintext and the TLS server."""
    return request.getfixturevalue("secure_server" if request.param == "plain" else "tls_server")


# --- the quick tier: `pytest -m "not slow"` ---------------------------------------------------------------------
# A test is marked slow when it (or a fixture it uses, or a helper of this repository it calls, followed
# through the call graph) starts a process: a server, PostgreSQL, the S3 server, a demo load, an interpreter,
# a virtual environment. Decided per test, not per module, so the pure tests of a module that also starts
# servers (parsers, config, contracts, SQL checks) stay in the quick tier. A module or test may still mark
# itself slow explicitly.
import ast  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import subprocess  # noqa: E402
import textwrap  # noqa: E402
from types import FunctionType, ModuleType  # noqa: E402

import dlt as _dlt  # noqa: E402

from flight_server.cli.demo import load_demo as _load_demo  # noqa: E402
from flight_server.testing import servers as _servers  # noqa: E402
from flight_server.testing import services as _services  # noqa: E402

# what starts a process: the test helpers that do, and subprocess itself (and what loads with dlt)
_STARTS_A_PROCESS = {
    _servers.ServerProcess, _servers.cli, _services.PostgresServer, _services.S3Server,
    _services.postgres_server, _services.s3_server,
    subprocess.run, subprocess.Popen, subprocess.call, subprocess.check_call, subprocess.check_output,
    # a dlt load in this process takes seconds as well (the demo's, or an owner's pipeline)
    _dlt.pipeline, _load_demo,
}
_OURS = ("tests", "flight_server.testing")  # helpers followed into (the server's own code is not)
_verdicts: dict[int, bool] = {}


def _resolve(node: ast.expr, scope: dict[str, Any]) -> Any:
    """The object a call's callee names (``f``, ``mod.f``, ``mod.Class``), or None."""
    if isinstance(node, ast.Name):
        return scope.get(node.id, getattr(__builtins__, node.id, None) if not isinstance(__builtins__, dict)
                         else __builtins__.get(node.id))
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, scope)
        return getattr(base, node.attr, None) if isinstance(base, (ModuleType, type)) else None
    return None


def _starts_a_process(obj: Any) -> bool:
    """Whether calling ``obj`` (a function or class of this repository's tests) may start a process."""
    obj = inspect.unwrap(obj) if callable(obj) else obj
    try:
        if obj in _STARTS_A_PROCESS:
            return True
    except TypeError:  # unhashable
        return False
    if id(obj) in _verdicts:
        return _verdicts[id(obj)]
    if not isinstance(obj, (FunctionType, type)) or not (getattr(obj, "__module__", "") or "").startswith(_OURS):
        return False
    _verdicts[id(obj)] = False  # a recursive helper is judged by its other calls
    functions = [obj] if isinstance(obj, FunctionType) else [
        f for f in vars(obj).values() if isinstance(f, (FunctionType, property, staticmethod, classmethod))]
    verdict = False
    for f in functions:
        f = f.fget if isinstance(f, property) else getattr(f, "__func__", f)
        if f is None:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(f)))
        except (OSError, TypeError, SyntaxError):
            continue
        scope = {**f.__globals__, **{n: c.cell_contents for n, c in zip(f.__code__.co_freevars, f.__closure__ or ())
                                      if _has_contents(c)}, **_local_imports(tree)}
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
        # request.getfixturevalue(...) picks a fixture at run time: counted as one that starts a process
        if any(isinstance(n.func, ast.Attribute) and n.func.attr == "getfixturevalue" for n in calls) or any(
                _starts_a_process(_resolve(n.func, scope)) for n in calls):
            verdict = True
            break
    _verdicts[id(obj)] = verdict
    return verdict


def _local_imports(tree: ast.AST) -> dict[str, Any]:
    """Names bound by imports inside a function body (``import subprocess`` in a test)."""
    found: dict[str, Any] = {}
    for node in ast.walk(tree):
        try:
            if isinstance(node, ast.Import):
                for a in node.names:
                    top = importlib.import_module(a.name.split(".")[0] if a.asname is None else a.name)
                    found[a.asname or a.name.split(".")[0]] = top
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                module = importlib.import_module(node.module)
                for a in node.names:
                    found[a.asname or a.name] = getattr(module, a.name, None)
        except ImportError:
            continue
    return found


def _has_contents(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _is_slow(item: pytest.Item) -> bool:
    if item.get_closest_marker("slow") is not None:
        return True
    if isinstance(item, pytest.Function) and _starts_a_process(item.function):
        return True
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        for fixturedef in (info.name2fixturedefs.get(name, ()) if info is not None else ()):
            if _starts_a_process(fixturedef.func):
                return True
    return False


def _shares_module_state(item: pytest.Item) -> bool:
    """Whether the test uses a fixture kept for its module or class (a server, a loaded project)."""
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(
        d.scope in ("module", "class", "package") for defs in info.name2fixturedefs.values() for d in defs)


class _LoadGroupIds:
    """pytest-xdist (3.8) tells its controller a test's group by appending ``@group`` to ``item._nodeid``, which
    pytest 9.2 no longer reads (a node's id is structured now, ``item._id``): ``--dist loadgroup`` then spread
    every module's tests over both workers and each worker set up the module's fixtures - every shared server,
    PostgreSQL dataset and demo load twice (pytest-dev/pytest-xdist#1386, fix pending in #1388). Until
    pytest-xdist writes the id pytest reads, this puts the same suffix there, after pytest-xdist's own hook
    (nothing to do where that hook already did it: an older pytest, a fixed pytest-xdist)."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if not getattr(config.option, "loadgroup", False):  # set in pytest-xdist's workers under --dist loadgroup
            return
        from _pytest.nodeid import NodeId  # pytest >= 9.2, where the suffix is needed

        for item in items:
            names = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
            suffix = "@" + "_".join(sorted(names))
            if names and not item.nodeid.endswith(suffix):
                item._id = NodeId.parse(item.nodeid + suffix)  # type: ignore[attr-defined]


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_LoadGroupIds(), "flight-share-loadgroup-ids")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
        # `make test` runs `pytest -n 2 --dist loadgroup`: the tests of a module that share a module
        # (or class) fixture run on one worker, so that fixture starts once; every other test goes to
        # whichever worker is free (session fixtures such as PostgreSQL start once per worker)
        if _shares_module_state(item) and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__ if item.module else item.nodeid))
