"""Third-party Flight SQL clients against a real server, each used the way its users use it.

Every client that installs here (pyproject's ``test`` extra, tests/js/package.json) connects
anonymously where it can, with a password and with an API token; browses catalogs, schemas, tables and
columns; runs a query whose answer is compared with the plain read of flight-share's own client;
ingests under the profile's contracts where it can; and keeps one connection busy past ``token_ttl``.

The project is the demo (``access`` profile: github_events_dataset frozen, reports_dataset open to new
tables) plus two users: ``alice`` (password) and ``bot`` (API token), both of the ``access`` profile.

The connection helpers (``adbc_connect``, ``gizmosql_connect``, ``sqlalchemy_engine``,
``python_session``, ``node_session``) take a :class:`Login`, so tests of bound parameters and the
current schema can be added per client the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import adbc_driver_flightsql.dbapi as adbc
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
import sqlalchemy
from adbc_driver_flightsql import DatabaseOptions

from client import connect, protocol
from flight_server.domain.credentials import hash_password, hash_token
from flight_server.testing.servers import REPO, ServerProcess, make_project
from tests.test_js_reader import JS_DIR, node  # noqa: F401 - the fixture that installs the npm packages

PROJECT = "dlt_example_project"
EVENTS = "github_events_dataset"
REPORTS = "reports_dataset"
JWT_SECRET = "client-tests-signing-secret-0123456789-abcdef"
PASSWORD = "alice-pw-Correct-Horse"
TOKEN = "fst_client-tests-api-token-0123456789abcdefghij"
TTL = 3  # seconds, for the server that long-lived connections use
QUERY = f"SELECT id, payload__action FROM {EVENTS}.issues_event ORDER BY id"
COUNT = f"SELECT count(*) AS n FROM {EVENTS}.push_event"
# ADBC's cookie middleware: Flight sessions (SetSessionOptions, the current schema) ride on a cookie
COOKIES = {"adbc.flight.sql.rpc.with_cookie_middleware": "true"}
# bound parameters: ? (or $1) placeholders; the values compared with the plain read filtered alike
PARAM_QUERY = f"SELECT id, payload__action FROM {EVENTS}.issues_event WHERE payload__action = ? ORDER BY id"
UNQUALIFIED = "SELECT id, payload__action FROM issues_event ORDER BY id"
UNQUALIFIED_PARAM = "SELECT id, payload__action FROM issues_event WHERE payload__action = ? ORDER BY id"
HOSTILE = f"opened' OR '1'='1'; DROP TABLE {EVENTS}.issues_event; --"
# what the server answers ...
NO_COOKIE_TEXT = ("session options need Flight's session cookie, and this call came without one: keep cookies "
                  "(ADBC: db_kwargs {\"adbc.flight.sql.rpc.with_cookie_middleware\": \"true\"}) or write tables as "
                  "dataset.table")
UNQUALIFIED_TEXT = ("qualify every table with its dataset, as dataset.table (unqualified: issues_event), or set the "
                    f"current db_schema (SetSessionOptions, with cookies); datasets: {EVENTS}, {REPORTS}")
UNBOUND_TEXT = "the statement has 1 parameter(s) and no values are bound"
READ_ONLY_TEXT = ("CommandPreparedStatementUpdate is not supported: the server is read-only except bulk ingest "
                  "(CommandStatementIngest, adbc_ingest); statements are SELECT queries")
FROZEN_TABLE_TEXT = (
    "In schema: events: In Schema: events Table: aggregated_issues. Contract on tables with mode freeze is "
    "violated. Trying to add table aggregated_issues but new tables are frozen."
)


@dataclass(frozen=True)
class Login:
    """How a client authenticates: nothing, a user name and password, or an API token."""

    kind: str  # anonymous | password | token
    username: str | None = None
    password: str | None = None
    token: str | None = None

    def as_json(self) -> dict[str, str]:
        return {k: v for k, v in (("username", self.username), ("password", self.password),
                                  ("token", self.token)) if v is not None}


LOGINS = {
    "anonymous": Login("anonymous"),
    "password": Login("password", "alice", PASSWORD),
    "token": Login("token", token=TOKEN),
}
ALL_LOGINS = list(LOGINS)


def _project(folder: Path, base: Path, ttl: int | None) -> Path:
    """A copy of the loaded demo project (duckdb files are locked per process) with users and a ttl."""
    shutil.copytree(base.parent, folder)
    project = folder / "dlt.yml"
    text = project.read_text().rstrip("\n") + "\n"
    assert text.endswith("  anonymous_profile: access\n")  # the demo's server block is last
    text += '  jwt_secret: "{env.FLIGHT_SHARE_JWT_SECRET}"\n' + (f"  token_ttl: {ttl}\n" if ttl else "")
    text += (f"users:\n  alice: {{profile: access, password_hash: \"{hash_password(PASSWORD, n=1 << 10)}\"}}\n"
             f"  bot: {{profile: access, token_hash: \"{hash_token(TOKEN)}\"}}\n")
    project.write_text(text)
    return project


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("clients") / "base", events=300)


def _serve(tmp_path_factory: pytest.TempPathFactory, demo: Path, name: str, ttl: int | None) -> Iterator[ServerProcess]:
    project = _project(tmp_path_factory.mktemp("clients") / name, demo, ttl)
    with ServerProcess(project, env={"FLIGHT_SHARE_JWT_SECRET": JWT_SECRET}) as proc:
        yield proc
        assert proc.alive, proc.output()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo: Path) -> Iterator[ServerProcess]:
    """The demo with users, default token_ttl (1 h); clients ingest into it."""
    yield from _serve(tmp_path_factory, demo, "main", None)


@pytest.fixture(scope="module")
def ttl_server(tmp_path_factory: pytest.TempPathFactory, demo: Path) -> Iterator[ServerProcess]:
    """The same with bearer tokens that expire after TTL seconds."""
    yield from _serve(tmp_path_factory, demo, "ttl", TTL)


@dataclass
class Expected:
    """What flight-share's own client reads: the yardstick for every third-party client."""

    tables: list[str]
    columns: list[str]
    rows: list[list[Any]]
    count: int
    datasets: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def expected(server: ServerProcess) -> Expected:
    with connect(server.url) as catalog:
        plain = catalog[EVENTS]["issues_event"].select("id", "payload__action").arrow().sort_by("id")
        return Expected(
            tables=sorted(catalog[EVENTS].tables), columns=catalog[EVENTS]["issues_event"].schema.names,
            rows=[[r["id"], r["payload__action"]] for r in plain.to_pylist()],
            count=catalog[EVENTS]["push_event"].row_count(), datasets=sorted(catalog.datasets))


def _rows(table: pa.Table) -> list[list[Any]]:
    return [list(r.values()) for r in table.to_pylist()]


# --- connection helpers, one per client ------------------------------------------------------------

def adbc_connect(server: ServerProcess, login: Login, cookies: bool = False) -> adbc.Connection:
    """ADBC's Flight SQL driver (Go): grpc:// URI; username/password, or the token as an authorization header;
    ``cookies`` turns on the driver's cookie middleware, which session options (the current schema) need."""
    db_kwargs: dict[str, str] = dict(COOKIES) if cookies else {}
    if login.username is not None:
        db_kwargs.update(username=login.username, password=login.password or "")
    if login.token is not None:
        db_kwargs[DatabaseOptions.AUTHORIZATION_HEADER.value] = protocol.BEARER_PREFIX + login.token
    return adbc.connect(server.url, db_kwargs=db_kwargs, autocommit=True)


def gizmosql_connect(server: ServerProcess, login: Login, cookies: bool = False, **options: Any) -> Any:
    """adbc-driver-gizmosql: grpc+tcp:// for plaintext; username/password, or the token as an authorization header;
    ``options`` go to ``gizmosql.connect`` (``db_schema=``: the current schema, applied at connect time)."""
    from adbc_driver_gizmosql import dbapi as gizmosql

    db_kwargs = dict(COOKIES) if cookies else {}
    if login.token is not None:
        db_kwargs[DatabaseOptions.AUTHORIZATION_HEADER.value] = protocol.BEARER_PREFIX + login.token
    return gizmosql.connect(f"grpc+tcp://127.0.0.1:{server.port}", username=login.username, password=login.password,
                            db_kwargs=db_kwargs or None, **options)


def sqlalchemy_url(server: ServerProcess, login: Login) -> str:
    """sqlalchemy-adbc: ``adbc+flightsql://HOST:PORT?tls=false``; a password login as the driver's
    username/password options, a token as the URL's password (sent as ``Bearer <token>``)."""
    base = f"127.0.0.1:{server.port}?tls=false"
    if login.token is not None:
        return f"adbc+flightsql://token:{urllib.parse.quote(login.token, safe='')}@{base}"
    if login.username is not None:
        return (f"adbc+flightsql://{base}&username={urllib.parse.quote(login.username)}"
                f"&password={urllib.parse.quote(login.password or '', safe='')}")
    return f"adbc+flightsql://{base}"


def sqlalchemy_engine(server: ServerProcess, login: Login, **engine_args: Any) -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(sqlalchemy_url(server, login), **engine_args)


def python_session(client: str, action: str, server: ServerProcess, login: Login, **args: Any) -> dict[str, Any]:
    """A session of flightsql-dbapi or altertable-flightsql in a fresh interpreter (tests/client_sessions.py)."""
    payload = json.dumps({"port": server.port, "login": login.as_json(), **args})
    result = subprocess.run([sys.executable, "-m", "tests.client_sessions", client, action, payload], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def node_session(node_bin: str, action: str, server: ServerProcess, login: Login, **args: Any) -> dict[str, Any]:
    """A session of npm's @lakehouse-rs/flight-sql-client (tests/js/flight_sql_client.mjs)."""
    payload = json.dumps({"login": login.as_json(), **args})
    result = subprocess.run([node_bin, str(JS_DIR / "flight_sql_client.mjs"), str(server.port), action, payload],
                            capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_browsed(answer: dict[str, Any], expected: Expected) -> None:
    assert "error" not in answer, answer
    assert answer["catalogs"] == [PROJECT]
    assert sorted(answer["schemas"]) == expected.datasets
    assert sorted(answer["tables"]) == expected.tables
    assert answer["columns"] == expected.columns


def _count(cur: Any) -> int:
    cur.execute(COUNT)
    return cur.fetchone()[0]


def keep_busy(run: Any, seconds: float = 3 * TTL, every: float = 0.5) -> list[Any]:
    """Call ``run()`` on one connection every ``every`` seconds until a call succeeded after ``seconds``."""
    answers, started = [], time.monotonic()
    while True:
        answers.append(run())
        if time.monotonic() - started >= seconds:
            return answers
        time.sleep(every)


# --- ADBC Flight SQL driver (adbc-driver-flightsql), and pandas / polars over its connection -----------

def _adbc_browse(conn: Any) -> dict[str, Any]:
    objects = conn.adbc_get_objects(depth="all").read_all().to_pylist()
    schemas = {s["db_schema_name"]: s for s in objects[0]["catalog_db_schemas"]}
    tables = {t["table_name"]: t for t in schemas[EVENTS]["db_schema_tables"]}
    return {"catalogs": [c["catalog_name"] for c in objects], "schemas": list(schemas), "tables": list(tables),
            "columns": [c["column_name"] for c in tables["issues_event"]["table_columns"]]}


@pytest.mark.parametrize("login", ALL_LOGINS)
def test_adbc_driver_browses_and_queries(server: ServerProcess, expected: Expected, login: str) -> None:
    with adbc_connect(server, LOGINS[login]) as conn:
        _assert_browsed(_adbc_browse(conn), expected)
        assert conn.adbc_get_table_schema("issues_event", db_schema_filter=EVENTS).names == expected.columns
        with conn.cursor() as cur:
            cur.execute(QUERY)
            assert _rows(cur.fetch_arrow_table()) == expected.rows


@pytest.mark.parametrize("login", ALL_LOGINS)
def test_pandas_and_polars_read_over_an_adbc_connection(server: ServerProcess, expected: Expected, login: str) -> None:
    with adbc_connect(server, LOGINS[login]) as conn:
        frame = pd.read_sql(QUERY, conn)
        assert list(frame.columns) == ["id", "payload__action"]
        assert frame.values.tolist() == expected.rows
        polars_frame = pl.read_database(QUERY, connection=conn)
        assert polars_frame.rows() == [tuple(r) for r in expected.rows]


def _opened(expected: Expected) -> list[list[Any]]:
    """The plain read's rows whose action is "opened": what PARAM_QUERY bound to "opened" answers."""
    rows = [r for r in expected.rows if r[1] == "opened"]
    assert 0 < len(rows) < len(expected.rows)
    return rows


@pytest.mark.parametrize("login", ALL_LOGINS)
def test_adbc_driver_binds_parameters(server: ServerProcess, expected: Expected, login: str) -> None:
    """``cursor.execute(sql, params)``: the driver prepares, binds the values by DoPut and executes the handle
    the server answers; a hostile value stays a value. ``executemany`` is an update in DB-API (DoPut
    CommandPreparedStatementUpdate): refused, the server is read-only except ingest."""
    with adbc_connect(server, LOGINS[login]) as conn, conn.cursor() as cur:
        cur.execute(PARAM_QUERY, ("opened",))
        assert _rows(cur.fetch_arrow_table()) == _opened(expected)
        cur.execute(PARAM_QUERY.replace("?", "$1"), parameters=["opened"])
        assert _rows(cur.fetch_arrow_table()) == _opened(expected)
        cur.execute(PARAM_QUERY, (HOSTILE,))
        assert cur.fetchall() == []
        cur.execute("SELECT ? AS v", (HOSTILE,))
        assert cur.fetchall() == [(HOSTILE,)]
        with pytest.raises(adbc.NotSupportedError) as refused:
            cur.executemany(PARAM_QUERY, [("opened",), ("closed",)])
        assert str(refused.value).startswith(f"NOT_IMPLEMENTED: [FlightSQL] {READ_ONLY_TEXT}")
        cur.execute(QUERY)  # all still there
        assert _rows(cur.fetch_arrow_table()) == expected.rows


@pytest.mark.parametrize("login", ALL_LOGINS)
def test_adbc_driver_current_db_schema_with_cookies(server: ServerProcess, expected: Expected, login: str) -> None:
    """``conn.adbc_current_db_schema = dataset`` (SetSessionOptions) with the driver's cookie middleware on:
    unqualified names resolve there, with parameters too. Without cookies the driver is told to keep them."""
    with adbc_connect(server, LOGINS[login], cookies=True) as conn:
        with conn.cursor() as cur:
            with pytest.raises(adbc.ProgrammingError, match=r"^INVALID_ARGUMENT: \[FlightSQL\] qualify every table"):
                cur.execute(UNQUALIFIED)
        conn.adbc_current_db_schema = EVENTS
        assert conn.adbc_current_db_schema == EVENTS
        with conn.cursor() as cur:
            cur.execute(UNQUALIFIED)
            assert _rows(cur.fetch_arrow_table()) == expected.rows
            cur.execute(UNQUALIFIED_PARAM, ("opened",))
            assert _rows(cur.fetch_arrow_table()) == _opened(expected)
            cur.execute(QUERY)  # qualified names keep working
            assert _rows(cur.fetch_arrow_table()) == expected.rows
    with adbc_connect(server, LOGINS[login]) as cookieless:
        with pytest.raises(adbc.ProgrammingError) as refused:
            cookieless.adbc_current_db_schema = EVENTS
        assert str(refused.value).startswith(f"INVALID_ARGUMENT: [FlightSQL] {NO_COOKIE_TEXT}")


def test_polars_binds_parameters_pandas_refuses_them_over_adbc(server: ServerProcess, expected: Expected) -> None:
    """polars ``read_database(..., execute_options={"parameters": [...]})`` hands the values to the driver;
    pandas 3.1 refuses ``params`` over an ADBC connection by itself (no call reaches the server), so pandas
    users put the values into the SQL text, or go through SQLAlchemy (below). Both read unqualified names
    once the connection's current schema is set."""
    with adbc_connect(server, LOGINS["password"], cookies=True) as conn:
        frame = pl.read_database(PARAM_QUERY, conn, execute_options={"parameters": ["opened"]})
        assert frame.rows() == [tuple(r) for r in _opened(expected)]
        with pytest.raises(NotImplementedError, match=r"^'params' is not implemented for ADBC drivers$"):
            pd.read_sql(PARAM_QUERY, conn, params=["opened"])
        conn.adbc_current_db_schema = EVENTS
        assert pl.read_database(UNQUALIFIED, conn).rows() == [tuple(r) for r in expected.rows]
        assert pd.read_sql(UNQUALIFIED, conn).values.tolist() == expected.rows
        frame = pl.read_database(UNQUALIFIED_PARAM, conn, execute_options={"parameters": ["opened"]})
        assert frame.rows() == [tuple(r) for r in _opened(expected)]


@pytest.mark.parametrize("login", ["password", "token"])
def test_adbc_ingest_goes_through_the_contracts(server: ServerProcess, login: str) -> None:
    data = pa.table({"payload__action": ["opened", "closed"], "n": [3, 4]})
    with adbc_connect(server, LOGINS[login]) as conn, conn.cursor() as cur:
        with pytest.raises(adbc.Error) as frozen:
            cur.adbc_ingest("aggregated_issues", data, mode="create", db_schema_name=EVENTS)
        assert FROZEN_TABLE_TEXT in str(frozen.value)
        assert cur.adbc_ingest(f"adbc_{login}", data, mode="create", db_schema_name=REPORTS) == 2
        cur.execute(f"SELECT payload__action, n FROM {REPORTS}.adbc_{login} ORDER BY n")
        assert cur.fetchall() == [("opened", 3), ("closed", 4)]


def test_adbc_connection_made_with_a_password_outlives_the_token_ttl(ttl_server: ServerProcess,
                                                                   expected: Expected) -> None:
    """The Go driver adopts a Bearer from any response's headers, so the server's renewal keeps it alive."""
    with adbc_connect(ttl_server, LOGINS["password"]) as conn, conn.cursor() as cur:
        counts = keep_busy(lambda: _count(cur))
    assert len(counts) > 3 and set(counts) == {expected.count}


# --- adbc-driver-gizmosql (the Go driver under GizmoSQL's name) -----------------------------------------

@pytest.mark.parametrize("login", ALL_LOGINS)
def test_gizmosql_driver_browses_and_queries(server: ServerProcess, expected: Expected, login: str) -> None:
    with gizmosql_connect(server, LOGINS[login]) as conn:
        _assert_browsed(_adbc_browse(conn), expected)
        with conn.cursor() as cur:
            cur.execute(QUERY)
            assert _rows(cur.fetch_arrow_table()) == expected.rows


def test_gizmosql_ingest_and_a_connection_past_the_token_ttl(server: ServerProcess, ttl_server: ServerProcess,
                                                             expected: Expected) -> None:
    data = pa.table({"payload__action": ["opened"], "n": [1]})
    with gizmosql_connect(server, LOGINS["password"]) as conn, conn.cursor() as cur:
        with pytest.raises(Exception) as frozen:
            cur.adbc_ingest("aggregated_issues", data, mode="create", db_schema_name=EVENTS)
        assert FROZEN_TABLE_TEXT in str(frozen.value)
    with gizmosql_connect(ttl_server, LOGINS["password"]) as conn, conn.cursor() as cur:
        counts = keep_busy(lambda: _count(cur))
    assert len(counts) > 3 and set(counts) == {expected.count}


@pytest.mark.parametrize("login", ALL_LOGINS)
def test_gizmosql_driver_binds_parameters_and_takes_db_schema(server: ServerProcess, expected: Expected,
                                                              login: str) -> None:
    """``cursor.execute(sql, params)`` binds; ``gizmosql.connect(..., db_schema=dataset)`` sets the current
    schema at connect time (SetSessionOptions) - with the cookie middleware on (``db_kwargs``), which the
    GizmoSQL driver leaves off by default: without it the connect itself fails with the server's text."""
    with gizmosql_connect(server, LOGINS[login]) as conn, conn.cursor() as cur:
        cur.execute(PARAM_QUERY, ("opened",))
        assert _rows(cur.fetch_arrow_table()) == _opened(expected)
        cur.execute(PARAM_QUERY, (HOSTILE,))
        assert cur.fetchall() == []
    with gizmosql_connect(server, LOGINS[login], cookies=True, db_schema=EVENTS) as conn, conn.cursor() as cur:
        assert conn.adbc_current_db_schema == EVENTS
        cur.execute(UNQUALIFIED)
        assert _rows(cur.fetch_arrow_table()) == expected.rows
        cur.execute(UNQUALIFIED_PARAM, ("opened",))
        assert _rows(cur.fetch_arrow_table()) == _opened(expected)
    with pytest.raises(Exception) as refused:
        gizmosql_connect(server, LOGINS[login], db_schema=EVENTS)
    assert type(refused.value).__name__ == "ProgrammingError"
    assert str(refused.value).startswith(f"INVALID_ARGUMENT: [FlightSQL] {NO_COOKIE_TEXT}")


# --- sqlalchemy-adbc (SQLAlchemy over the ADBC driver), and pandas read_sql through the engine ------------

@pytest.mark.parametrize("login", ALL_LOGINS)
def test_sqlalchemy_adbc_reflects_and_queries(server: ServerProcess, expected: Expected, login: str) -> None:
    engine = sqlalchemy_engine(server, LOGINS[login])
    try:
        inspector = sqlalchemy.inspect(engine)
        assert sorted(inspector.get_schema_names()) == expected.datasets
        # inspector.get_table_names(schema=EVENTS) is [] today: sqlalchemy-adbc keeps table_type == "table"
        # (lowercase) and the server answers Flight SQL's "TABLE" (transport/flight_sql/metadata.py TABLE_TYPE)
        assert [c["name"] for c in inspector.get_columns("issues_event", schema=EVENTS)] == expected.columns
        with engine.connect() as conn:
            assert [list(r) for r in conn.execute(sqlalchemy.text(QUERY)).fetchall()] == expected.rows
        assert pd.read_sql(QUERY, engine).values.tolist() == expected.rows
    finally:
        engine.dispose()


@pytest.mark.parametrize("login", ALL_LOGINS)
def test_sqlalchemy_adbc_binds_parameters(server: ServerProcess, expected: Expected, login: str) -> None:
    """``text()`` with ``:name`` parameters (the dialect sends them as ``?``), and pandas ``read_sql`` with
    ``params=`` through the engine (pandas refuses them over a bare ADBC connection, not over SQLAlchemy)."""
    named = PARAM_QUERY.replace("?", ":action")
    engine = sqlalchemy_engine(server, LOGINS[login])
    try:
        with engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text(named), {"action": "opened"}).fetchall()
            assert [list(r) for r in rows] == _opened(expected)
            assert conn.execute(sqlalchemy.text(named), {"action": HOSTILE}).fetchall() == []
        frame = pd.read_sql(sqlalchemy.text(named), engine, params={"action": "opened"})
        assert frame.values.tolist() == _opened(expected)
        assert pd.read_sql(PARAM_QUERY, engine, params=("opened",)).values.tolist() == _opened(expected)
    finally:
        engine.dispose()


def test_sqlalchemy_adbc_current_schema_through_connect_args(server: ServerProcess, expected: Expected) -> None:
    """The dialect passes the URL's query to the driver as database options: the cookie middleware goes there,
    but the current schema is a connection option (``adbc.connection.db_schema``), which the driver refuses
    among database options - it goes in ``connect_args={"conn_kwargs": ...}``, applied to every pooled
    connection. ``pd.read_sql_table(table, engine, schema=...)`` still cannot reflect the table: the
    dialect keeps tables of type ``table`` (lowercase), the server answers Flight SQL's ``TABLE``."""
    login = LOGINS["password"]
    cookies = "&adbc.flight.sql.rpc.with_cookie_middleware=true"
    in_url = sqlalchemy.create_engine(sqlalchemy_url(server, login) + cookies + f"&adbc.connection.db_schema={EVENTS}")
    try:
        with pytest.raises(sqlalchemy.exc.ProgrammingError) as refused:
            in_url.connect()
        assert ("INVALID_ARGUMENT: [Flight SQL] [Flight SQL] Unknown database option 'adbc.connection.db_schema'"
                in str(refused.value))
    finally:
        in_url.dispose()
    engine = sqlalchemy.create_engine(sqlalchemy_url(server, login) + cookies,
                                      connect_args={"conn_kwargs": {"adbc.connection.db_schema": EVENTS}})
    try:
        with engine.connect() as conn:
            assert [list(r) for r in conn.execute(sqlalchemy.text(UNQUALIFIED)).fetchall()] == expected.rows
            rows = conn.execute(sqlalchemy.text(UNQUALIFIED_PARAM.replace("?", ":a")), {"a": "opened"}).fetchall()
            assert [list(r) for r in rows] == _opened(expected)
        assert pd.read_sql(UNQUALIFIED, engine).values.tolist() == expected.rows
        with pytest.raises(sqlalchemy.exc.InvalidRequestError) as unreflected:
            pd.read_sql_table("issues_event", engine, schema=EVENTS)
        assert str(unreflected.value) == (f"Could not reflect: requested table(s) not available in {engine!r} "
                                          f"schema '{EVENTS}': (issues_event)")
    finally:
        engine.dispose()


def test_sqlalchemy_adbc_connection_past_the_token_ttl(ttl_server: ServerProcess, expected: Expected) -> None:
    engine = sqlalchemy_engine(ttl_server, LOGINS["password"])
    try:
        with engine.connect() as conn:
            counts = keep_busy(lambda: conn.execute(sqlalchemy.text(COUNT)).scalar())
        assert len(counts) > 3 and set(counts) == {expected.count}
    finally:
        engine.dispose()


# --- flightsql-dbapi (DB-API 2 on pyarrow.flight) ----------------------------------------------------------

@pytest.mark.parametrize("login", ALL_LOGINS)
@pytest.mark.parametrize("client", ["flightsql-dbapi", "altertable-flightsql"])
def test_python_dbapi_clients_browse_and_query(server: ServerProcess, expected: Expected, client: str,
                                                login: str) -> None:
    """Anonymous: flightsql-dbapi sends ``authorization: Bearer None``, altertable an empty user and password
    (it insists on both); the server takes either as no credentials."""
    browse = python_session(client, "browse", server, LOGINS[login], schema=EVENTS, table="issues_event")
    _assert_browsed(browse, expected)
    answer = python_session(client, "query", server, LOGINS[login], sql=QUERY)
    assert answer == {"columns": ["id", "payload__action"], "rows": expected.rows}


def test_flightsql_dbapi_past_the_token_ttl(ttl_server: ServerProcess) -> None:
    """flightsql-dbapi keeps the Bearer of its login for good (it never reads response headers): the server
    takes that token past its expiry while its session (server.session_ttl, 12 h) lasts, so a password
    connection keeps working past token_ttl, as one with an API token (which does not expire) does."""
    args = {"sql": COUNT, "seconds": 3 * TTL, "every": 0.5}
    for login in ("token", "password"):
        answer = python_session("flightsql-dbapi", "long_lived", ttl_server, LOGINS[login], **args)
        assert "error" not in answer and answer["last_ok_after"] >= 3 * TTL and len(answer["counts"]) > 3, login


def _server_error(answer: dict[str, Any]) -> str:
    """The server's text of a pyarrow client's error answer (pyarrow appends "Detail: ..." and debug context)."""
    assert set(answer) == {"error", "message"}, answer
    assert answer["error"] == "ArrowInvalid", answer
    return protocol.server_message(answer["message"])


@pytest.mark.parametrize("login", ALL_LOGINS)
def test_flightsql_dbapi_binds_parameters_and_has_no_current_schema(server: ServerProcess, expected: Expected,
                                                                    login: str) -> None:
    """flightsql-dbapi's ``cursor.execute(sql, params)`` prepares, sends the values (DoPut, as dense unions) and
    then executes its *first* handle, not the one DoPutPreparedStatementResult answers: the server takes the
    values last bound to that handle on that connection. A hostile value stays a value; ``executemany`` runs
    once per row. It has no session API (no SetSessionOptions, no cookies): tables are written dataset.table,
    and an unqualified name gets the server's explanation."""
    answer = python_session("flightsql-dbapi", "query_with", server, LOGINS[login], sql=PARAM_QUERY, params=["opened"])
    assert answer == {"columns": ["id", "payload__action"], "rows": _opened(expected)}
    hostile = python_session("flightsql-dbapi", "query_with", server, LOGINS[login], sql=PARAM_QUERY, params=[HOSTILE])
    assert hostile["rows"] == []
    many = python_session("flightsql-dbapi", "executemany", server, LOGINS[login], sql=PARAM_QUERY,
                          rows=[["opened"], ["closed"]])
    assert "error" not in many, many
    schema = python_session("flightsql-dbapi", "set_schema", server, LOGINS[login], schema=EVENTS, sql=UNQUALIFIED)
    assert schema == {"error": "NotImplementedError", "message": "no session or current-schema API: []"}
    unqualified = python_session("flightsql-dbapi", "query", server, LOGINS[login], sql=UNQUALIFIED)
    assert _server_error(unqualified) == UNQUALIFIED_TEXT


# --- altertable-flightsql (user + password only: a token goes in as the password) --------------------------

def test_altertable_ingest_goes_through_the_contracts(server: ServerProcess) -> None:
    data = {"payload__action": ["opened", "closed"], "n": [3, 4]}
    frozen = python_session("altertable-flightsql", "ingest", server, LOGINS["token"], schema=EVENTS,
                            table="aggregated_issues", data=data, mode="create")
    assert FROZEN_TABLE_TEXT in frozen["message"] and TOKEN not in frozen["message"]
    made = python_session("altertable-flightsql", "ingest", server, LOGINS["password"], schema=REPORTS,
                          table="altertable_made", data=data, mode="create")
    assert made == {"rows": None}
    with connect(server.url) as catalog:
        assert catalog[REPORTS]["altertable_made"].arrow().sort_by("n").column("n").to_pylist() == [3, 4]


@pytest.mark.parametrize("login", ALL_LOGINS)
def test_altertable_parameters_and_current_schema_fail(server: ServerProcess, login: str) -> None:
    """altertable's ``prepare(sql).query(parameters=[...] or {...})`` asks GetFlightInfo of the unbound handle
    *before* it sends the values (and never reads the DoPut's answer): the server refuses a statement whose
    parameters are not bound. ``Client(..., schema=)`` and ``client.set_schema()`` send SetSessionOptions,
    but the client keeps no cookies (its only middleware carries the Bearer), so the server refuses them
    rather than forget the option: tables are written dataset.table."""
    for params in (["opened"], {"$1": "opened"}):
        answer = python_session("altertable-flightsql", "query_with", server, LOGINS[login],
                                sql=PARAM_QUERY.replace("?", "$1"), params=params)
        assert _server_error(answer).startswith(UNBOUND_TEXT)
    for action in ("set_schema", "connect_with_schema"):
        answer = python_session("altertable-flightsql", action, server, LOGINS[login], schema=EVENTS, sql=UNQUALIFIED)
        assert _server_error(answer) == NO_COOKIE_TEXT
    unqualified = python_session("altertable-flightsql", "query", server, LOGINS[login], sql=UNQUALIFIED)
    assert _server_error(unqualified) == UNQUALIFIED_TEXT


def test_altertable_connection_past_the_token_ttl(ttl_server: ServerProcess, expected: Expected) -> None:
    """altertable adopts the Bearer of every response, so the server's renewal keeps a password login alive."""
    answer = python_session("altertable-flightsql", "long_lived", ttl_server, LOGINS["password"], sql=COUNT,
                            seconds=3 * TTL, every=0.5)
    assert "error" not in answer, answer
    assert answer["last_ok_after"] >= 3 * TTL and len(answer["counts"]) > 3
    assert set(answer["counts"]) == {expected.count}


# --- npm @lakehouse-rs/flight-sql-client (arrow-rs) ---------------------------------------------------------

@pytest.mark.parametrize("login", ALL_LOGINS)
def test_node_flight_sql_client_browses_and_queries(node: str, server: ServerProcess,  # noqa: F811
                                                    expected: Expected, login: str) -> None:
    _assert_browsed(node_session(node, "browse", server, LOGINS[login], schema=EVENTS, table="issues_event"), expected)
    answer = node_session(node, "query", server, LOGINS[login], sql=QUERY)
    assert answer == {"columns": ["id", "payload__action"], "rows": expected.rows}


def _audit(server: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line.split("flight_share.audit ", 1)[1]) for line in server.settled_output().splitlines()
            if "flight_share.audit " in line]


def _refusals_during(server: ServerProcess, run: Any) -> tuple[Any, list[tuple[str, str]]]:
    """``run()``'s answer, and the calls the server refused while it ran (rpc, outcome)."""
    before = len(_audit(server))
    answer = run()
    return answer, [(a["rpc"], a["outcome"]) for a in _audit(server)[before:] if a["outcome"] != "ok"]


@pytest.mark.parametrize("login", ALL_LOGINS)
def test_node_flight_sql_client_has_no_parameters_nor_current_schema(node: str, server: ServerProcess,  # noqa: F811
                                                                     login: str) -> None:
    """The npm client offers ``query(sql)``, ``getCatalogs``, ``getDbSchemas`` and ``getTables`` only: no
    parameter binding, no prepared statement, no session option (and no cookies). ``query`` prepares and
    executes: a statement with a placeholder is prepared, then its execution is refused (nothing bound) -
    the wrapper says only "failed to execute prepared statement"; an unqualified name is refused at
    prepare ("failed to prepare statement"). The server's INVALID_ARGUMENT is in its audit log."""
    api = node_session(node, "api", server, LOGINS[login])
    assert api == {"methods": ["constructor", "getCatalogs", "getDbSchemas", "getTables", "query"]}
    answer, refused = _refusals_during(server, lambda: node_session(node, "query", server, LOGINS[login],
                                                                    sql=PARAM_QUERY))
    assert answer == {"error": "GenericFailure", "message": "failed to execute prepared statement"}
    assert refused == [("get_flight_info", "INVALID_ARGUMENT")]  # the prepare went through; executing did not
    answer, refused = _refusals_during(server, lambda: node_session(node, "query", server, LOGINS[login],
                                                                    sql=UNQUALIFIED))
    assert answer == {"error": "GenericFailure", "message": "failed to prepare statement"}
    assert refused == [("do_action", "INVALID_ARGUMENT")]  # CreatePreparedStatement


def test_node_flight_sql_client_past_the_token_ttl(node: str, ttl_server: ServerProcess) -> None:  # noqa: F811
    """arrow-rs's client keeps the Bearer of its Handshake for good (it never reads later response headers): the
    server takes that token past its expiry while its session (server.session_ttl, 12 h) lasts, so a password
    connection keeps working past token_ttl, as one with an API token (which does not expire) does. (Past the
    session the npm wrapper reports the UNAUTHENTICATED only as "failed to prepare statement".)"""
    args = {"sql": COUNT, "seconds": 3 * TTL, "every": 0.5}
    for login in ("token", "password"):
        answer = node_session(node, "long_lived", ttl_server, LOGINS[login], **args)
        assert "error" not in answer and answer["last_ok_after"] >= 3 * TTL and len(answer["counts"]) > 3, login


# --- last: nothing secret reached a log ---------------------------------------------------------------------

def test_no_password_token_or_bearer_in_the_server_logs(server: ServerProcess, ttl_server: ServerProcess) -> None:
    """After every client above logged in every way: no password, API token, signing secret or JWT in a log."""
    for proc in (server, ttl_server):
        log = proc.settled_output()
        assert "flight_share.audit" in log  # the logs are there to look at
        for secret in (PASSWORD, TOKEN, JWT_SECRET, "eyJ"):
            assert secret not in log
