"""Shared fixtures: a demo project in a temp folder and a real server process over it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from client import Catalog, connect
from tests.servers import ServerProcess, make_project


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


# --- real backing services (tests/services.py): one PostgreSQL and one S3 server per session --------
from tests.services import PostgresServer, S3Server, postgres_server, s3_server  # noqa: E402


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL on a free loopback port (password auth over TCP), stopped at session end."""
    yield from postgres_server()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A real S3-compatible server (moto_server) on a free loopback port with one bucket."""
    yield from s3_server()
