"""Shared fixtures: a demo project in a temp folder and a real server process over it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

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


# Modules whose tests run in this process (or start no server): `pytest -m "not slow"` runs them in
# seconds. Every other test starts a server process, PostgreSQL or the S3 server, and is marked slow.
FAST_MODULES = {"test_dispatch", "test_duckdb_file", "test_table_cache", "test_install", "test_save_errors"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] not in FAST_MODULES:
            item.add_marker(pytest.mark.slow)
