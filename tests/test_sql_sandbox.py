"""The read-only SQL sandbox: hostile statements over the network, both walls, limits, and correct results."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from client import InvalidRequestError, NotFoundError, PermissionDeniedError
from flight_server.domain.config import DatasetConfig, DestinationConfig
from flight_server.domain.errors import InvalidRequest
from flight_server.domain.sql import CheckedQuery, SqlSandbox, check_query
from flight_server.storage.duckdb import DuckDBStorage
from tests.conftest import Secured
from tests.security import EVENTS, INTERNAL, SQL_TIMEOUT

# a folder nothing may create; named per run, the same in every pytest-xdist worker (its test ids hold it)
OUT = Path(tempfile.gettempdir()) / f"flight-share-hostile-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"

HOSTILE = [
    # DDL and DML
    "DROP TABLE push_event",
    "CREATE TABLE stolen AS SELECT * FROM push_event",
    "ALTER TABLE push_event ADD COLUMN pwned INTEGER",
    "CREATE VIEW v AS SELECT 1",
    "CREATE MACRO pwn(x) AS x",
    "TRUNCATE push_event",
    "DELETE FROM push_event",
    "UPDATE push_event SET id = '0'",
    "INSERT INTO push_event SELECT * FROM push_event",
    "MERGE INTO push_event t USING push_event s ON t.id = s.id WHEN MATCHED THEN DELETE",
    "SELECT 1 AS x INTO stolen",
    "WITH x AS (DELETE FROM push_event RETURNING *) SELECT * FROM x",
    # several statements, comment tricks
    "SELECT * FROM push_event; DROP TABLE push_event",
    "SELECT 1; SELECT 2",
    "SELECT 1 /* ; */ ; DELETE FROM push_event --",
    "SELECT * FROM push_event -- comment\n; DELETE FROM push_event",
    "/* harmless */ DELETE FROM push_event",
    "SELECT * FROM read_csv/**/('/etc/passwd')",
    "SeLeCt * FrOm ReAd_CsV('/etc/passwd')",
    'SELECT * FROM "read_csv"(\'/etc/passwd\')',
    # files and the network
    f"ATTACH '{OUT}/x.duckdb' AS x",
    "ATTACH ':memory:' AS m",
    "DETACH lake",
    f"COPY push_event TO '{OUT}/out.csv'",
    f"COPY (SELECT 1) TO '{OUT}/out.parquet' (FORMAT parquet)",
    f"EXPORT DATABASE '{OUT}/export'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_csv_auto('/etc/passwd')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM read_parquet('s3://bucket/key.parquet')",
    "SELECT * FROM read_json('https://example.com/x.json')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_blob('/etc/hostname')",
    "SELECT * FROM sniff_csv('/etc/passwd')",
    "SELECT * FROM push_event, LATERAL read_csv('/etc/passwd')",
    "SELECT * FROM range(10)",
    # settings, environment, engine internals
    "PRAGMA database_list",
    "SET enable_external_access = true",
    "RESET memory_limit",
    "CALL pragma_version()",
    "SELECT getenv('HOME')",
    "SELECT current_setting('memory_limit')",
    "SELECT txid_current()",  # a worker's transaction count tells how many queries (anyone's) it ran
    "SELECT * FROM duckdb_settings()",
    "SELECT * FROM duckdb_tables()",
    "SELECT * FROM duckdb_databases()",
    "SELECT * FROM query('SELECT 1')",
    "SELECT * FROM query_table('push_event')",
    "USE internal_dataset",
    "CHECKPOINT",
    "VACUUM",
    "DESCRIBE push_event",
    "SHOW TABLES",
    # other datasets and dlt's internal tables
    f"SELECT * FROM {INTERNAL}.push_event",
    f"SELECT * FROM lake.{INTERNAL}.push_event",
    f"SELECT * FROM push_event UNION ALL SELECT * FROM {INTERNAL}.push_event",
    f"SELECT * FROM push_event WHERE id IN (SELECT id FROM {INTERNAL}.push_event)",
    f"SELECT * FROM {EVENTS}._dlt_version",  # (_dlt_loads is readable: the load history, issue 13)
    "SELECT (SELECT count(*) FROM _dlt_pipeline_state) AS n",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM main.push_event",
    "SELECT * FROM pg_catalog.pg_tables",
    'SELECT * FROM "../lake"',
    # a CTE name in one scope does not hide a table of that name in another (issue 11, item 7)
    "SELECT * FROM (WITH pg_settings AS (SELECT 1 a) SELECT a FROM pg_settings) t, pg_settings",
    "SELECT * FROM (WITH duckdb_databases AS (SELECT 1 a) SELECT a FROM duckdb_databases) t, duckdb_databases",
    'SELECT * FROM (WITH "/tmp/x.tmp" AS (SELECT 1 a) SELECT a FROM "/tmp/x.tmp") t, "/tmp/x.tmp"',
    # blow-ups under the row (server.sql_max_rows: 50000), time (security.SQL_TIMEOUT) and memory (512MB) limits
    "SELECT a.id FROM push_event a, push_event b, push_event c",
    "SELECT count(*) FROM push_event a, push_event b, push_event c, push_event d, push_event e",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
    "SELECT length(string_agg(repeat(a.id, 100000), '')) FROM push_event a, push_event b",
]
assert len(HOSTILE) >= 40


def _fingerprint(catalog: Any) -> dict[str, Any]:
    """Row counts and a content hash of every table of every dataset (read as the admin)."""
    out = {}
    for dataset in catalog.datasets:
        ds = catalog[dataset]
        for table in ds.tables:
            result = ds.sql(f'SELECT count(*) AS n, sum(hash(_dlt_id)) AS h FROM "{table}"').arrow().to_pylist()[0]
            out[f"{dataset}.{table}"] = (result["n"], result["h"])
    return out


@pytest.fixture(scope="module")
def before(secure_server: Secured) -> dict[str, Any]:
    with secure_server.login("admin") as admin:
        return _fingerprint(admin)


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_statement_is_refused_clearly(secure_server: Secured, before: dict[str, Any], query: str) -> None:
    with secure_server.login("alice") as catalog:
        with pytest.raises((InvalidRequestError, NotFoundError, PermissionDeniedError)) as err:
            catalog[EVENTS].sql(query).arrow()
    message = str(err.value)
    assert message and "Traceback" not in message and "internal server error" not in message and ".py" not in message
    assert secure_server.proc.alive


def test_hostile_statements_changed_nothing(secure_server: Secured, before: dict[str, Any]) -> None:
    """Runs after the suite above (same module, file order): data identical, no files written, server serving."""
    with secure_server.login("admin") as admin:
        assert _fingerprint(admin) == before
    assert not OUT.exists()
    with secure_server.login("alice") as catalog:
        assert catalog[EVENTS].sql("SELECT count(*) AS n FROM push_event").arrow().column("n")[0].as_py() > 0


@pytest.mark.parametrize("query, words", [
    ("SELECT a.id FROM push_event a, push_event b, push_event c", "exceeds the limit of 50,000 rows"),
    ("SELECT count(*) FROM push_event a, push_event b, push_event c, push_event d, push_event e", f"time limit of {SQL_TIMEOUT} s"),
    ("DELETE FROM push_event", "only SELECT queries are allowed"),
    ("SELECT * FROM read_csv('/etc/passwd')", "function 'read_csv' is not allowed"),
    (f"SELECT * FROM {INTERNAL}.push_event", "outside dataset"),
])
def test_refusals_say_why_over_tls_too(secured: Secured, query: str, words: str) -> None:
    with secured.login("alice") as catalog:
        with pytest.raises((InvalidRequestError, NotFoundError)) as err:
            catalog[EVENTS].sql(query).arrow()
    assert words in str(err.value)


# --- the second wall on its own: what the engine refuses even if the allow-list were bypassed ----------------

@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory, secure_data: Path) -> Iterator[DuckDBStorage]:
    folder = tmp_path_factory.mktemp("sandbox-data") / "data"
    shutil.copytree(secure_data, folder)  # with the .wal, if any
    destination = DestinationConfig("lake", "duckdb", str(folder / "lake.duckdb"))
    store = DuckDBStorage(DatasetConfig(EVENTS, ("lake",)), destination, batch_rows=64)
    yield store
    store.close()


def _raw(sql: str, tables: dict[str, Any] | None = None) -> CheckedQuery:
    """A query that never went through the allow-list."""
    return CheckedQuery(sql, EVENTS, tables if tables is not None else {"push_event": None})


SECRET_PYTHON_VARIABLE = pa.table({"secret": ["python memory"]})


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM read_parquet('s3://bucket/key.parquet')",
    f"COPY (SELECT 1) TO '{OUT}/wall2.csv'",
    f"ATTACH '{OUT}/wall2.duckdb' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET memory_limit = '100GB'",
    "SELECT * FROM SECRET_PYTHON_VARIABLE",  # no Python replacement scans
    f"SELECT * FROM {EVENTS}._dlt_version",  # not in the sandbox at all
    f"SELECT * FROM {INTERNAL}.push_event",
    f'DELETE FROM {EVENTS}.push_event',
    "CREATE TABLE t AS SELECT 1",
])
def test_locked_down_engine_refuses_what_the_allow_list_would_have(storage: DuckDBStorage, sql: str) -> None:
    sandbox = SqlSandbox(max_rows=1000, timeout=5, memory_limit="256MB")
    with pytest.raises(InvalidRequest) as err:
        reader = sandbox.run(storage, _raw(sql))
        reader.read_all()
    assert err.value.message
    assert not OUT.exists()
    assert storage.row_count("push_event") > 0


def test_nothing_a_query_leaves_reaches_the_next_one_on_the_same_worker(storage: DuckDBStorage) -> None:
    """A worker keeps one duckdb for its life: each query runs in a transaction rolled back at its end,
    so a table a statement slipped past the allow-list would create, or the views of the last query's
    tables, are gone for the next query (maybe another user's). Workers are reused most recent first."""
    sandbox = SqlSandbox(max_rows=1000, timeout=5, memory_limit="255MB")
    for _ in range(3):
        with pytest.raises(InvalidRequest, match="only SELECT"):
            sandbox.run(storage, _raw("CREATE TABLE main.leak AS SELECT 42 AS x")).read_all()
        with pytest.raises(InvalidRequest, match="leak does not exist"):
            sandbox.run(storage, _raw("SELECT x FROM main.leak", {})).read_all()
        assert sandbox.run(storage, _raw(f"SELECT count(*) AS n FROM {EVENTS}.push_event")).read_all()["n"][0].as_py() > 0
        with pytest.raises(InvalidRequest, match="push_event does not exist"):  # last query's view: gone
            sandbox.run(storage, _raw(f"SELECT count(*) AS n FROM {EVENTS}.push_event", {})).read_all()


def test_sandbox_settings_are_locked(storage: DuckDBStorage) -> None:
    sandbox = SqlSandbox(max_rows=1000, timeout=5, memory_limit="256MB")
    settings = sandbox.run(storage, _raw(
        "SELECT current_setting('enable_external_access') AS ext, current_setting('lock_configuration') AS locked, "
        "current_setting('autoload_known_extensions') AS autoload")).read_all().to_pylist()[0]
    assert settings == {"ext": False, "locked": True, "autoload": False}


TRICKY = [
    "SELECT payload__action AS action, count(*) AS n FROM issues_event GROUP BY 1 ORDER BY 1",
    "SELECT count(*) AS n FROM push_event",
    "SELECT * FROM push_event ORDER BY id LIMIT 5",
    "SELECT p.id, count(c._dlt_id) AS commits FROM push_event p JOIN push_event__payload__commits c "
    "ON c._dlt_parent_id = p._dlt_id GROUP BY p.id ORDER BY p.id",
    "SELECT a.id FROM push_event a JOIN push_event b USING (id) ORDER BY 1",
    "WITH c AS (SELECT id, created_at FROM push_event) SELECT (SELECT count(*) FROM c) AS n, (SELECT max(id) FROM c) AS m",
    "SELECT id FROM push_event p WHERE EXISTS (SELECT 1 FROM push_event__payload__commits c WHERE c._dlt_parent_id = p._dlt_id) ORDER BY id",
    "SELECT COLUMNS('^payload__(head|ref)$') FROM push_event ORDER BY id",
    "SELECT * EXCLUDE (payload__head) FROM push_event ORDER BY id",
    "FROM push_event SELECT id ORDER BY id DESC LIMIT 3",
    "SELECT push_event FROM push_event ORDER BY id LIMIT 2",
    "SELECT id FROM push_event UNION SELECT id FROM watch_event ORDER BY 1",
]


@pytest.mark.parametrize("query", TRICKY)
def test_sandbox_results_equal_the_destinations_own(storage: DuckDBStorage, query: str) -> None:
    """Column pruning and the Arrow hand-off change nothing: same rows as duckdb on the file itself."""
    columns = {t: list(storage.table_columns(t)) for t in storage.table_names()}
    checked = check_query(query, EVENTS, columns)
    got = SqlSandbox(batch_rows=64).run(storage, checked).read_all()
    with storage.file.reading() as cursor:
        expected = cursor.sql(checked.sql).to_arrow_table()
    assert got.column_names == expected.column_names
    assert got.to_pylist() == expected.to_pylist()


def test_column_pruning_streams_only_what_the_query_uses() -> None:
    columns = {"t": ["a", "b", "c"], "u": ["a", "x"]}
    assert check_query("SELECT a FROM t", "d", columns).tables == {"t": frozenset({"a"})}
    assert check_query("SELECT count(*) FROM t", "d", columns).tables == {"t": frozenset()}
    assert check_query("SELECT t.b, u.x FROM t JOIN u ON t.a = u.a", "d", columns).tables == {
        "t": frozenset({"a", "b"}), "u": frozenset({"a", "x"})}
    # a star, COLUMNS(...) or a correlated reference: everything, to be safe
    assert check_query("SELECT * FROM t", "d", columns).tables == {"t": None}
    assert check_query("SELECT t.* EXCLUDE (c) FROM t", "d", columns).tables == {"t": None}
    assert check_query("SELECT COLUMNS('a|b') FROM t", "d", columns).tables == {"t": None}
    assert check_query("SELECT a FROM t WHERE b IN (SELECT x FROM u WHERE u.a = t.c)", "d", columns).tables == {
        "t": None, "u": None}


@pytest.mark.parametrize("query", [
    # sqlglot writes a -- comment back as /* ... */: "*/" inside it used to make the rest live SQL (issue 22)
    "SELECT a FROM t -- */ , (SELECT * FROM duckdb_settings()) AS s /*",
    "SELECT a /* x */ FROM t -- */ UNION ALL SELECT current_setting('threads')::VARCHAR /*",
    "-- */ SELECT 1 /*\nSELECT a FROM t",
])
def test_what_runs_is_exactly_what_was_checked_comments_are_dropped(query: str) -> None:
    checked = check_query(query, "d", {"t": ["a"]})
    assert checked.sql == 'SELECT a FROM "d"."t"'


# --- issue 11, item 7: CTE names resolve by scope ------------------------------------------------------

@pytest.mark.parametrize("query, tables", [
    ("SELECT * FROM (WITH pg_settings AS (SELECT 1 a) SELECT a FROM pg_settings) t, pg_settings", ["pg_settings"]),
    ("WITH a AS (SELECT 1 x), b AS (SELECT * FROM a) SELECT * FROM b, a", []),
    ("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a", ["b"]),  # not yet defined inside a
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r", []),
    ("WITH r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r", ["r"]),  # not RECURSIVE
    ("SELECT (WITH c AS (SELECT 1) SELECT * FROM c) FROM c", ["c"]),
    ("WITH c AS (SELECT 1) SELECT * FROM d.c", ["d.c"]),
    ("WITH a AS (SELECT 1 x) SELECT * FROM (WITH b AS (SELECT * FROM a) SELECT * FROM b) t, b", ["b"]),
    ("WITH c AS (SELECT 1) SELECT * FROM t UNION SELECT * FROM c", ["t"]),
    ("WITH c AS (SELECT 1) (SELECT * FROM c) UNION (SELECT * FROM c)", []),
    ("SELECT * FROM x WHERE EXISTS (WITH x AS (SELECT 1) SELECT * FROM x)", ["x"]),
])
def test_table_references_resolve_cte_names_by_scope(query: str, tables: list[str]) -> None:
    import sqlglot

    from flight_server.domain.sql import table_references

    assert [t.sql() for t in table_references(sqlglot.parse_one(query, read="duckdb"))] == tables


@pytest.mark.slow  # analyses 4,000 CTEs under tracemalloc: seconds of CPU, kept out of the quick tier
def test_many_ctes_are_analysed_in_bounded_memory() -> None:
    """sqlglot's traverse_scope copied every enclosing scope's sources into each scope: for 4,000 CTEs it
    peaked at 480 MB (traced), and that copying was also its time (1.2 s); the scope walk stays small. The
    peak is the outcome measured: it does not depend on how busy the machine is (a stopwatch would)."""
    import tracemalloc

    query = "WITH " + ", ".join(f"c{i} AS (SELECT 1 x)" for i in range(4000)) + " SELECT * FROM c0"
    tracemalloc.start()
    try:
        assert check_query(query, EVENTS, {"push_event": ["id"]}).tables == {}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 150 << 20, peak


def test_sandbox_has_no_temp_directory(storage: DuckDBStorage) -> None:
    """duckdb reads its temp directory even with external access off: the sandbox has none."""
    sandbox = SqlSandbox(max_rows=1000, timeout=5, memory_limit="256MB")
    row = sandbox.run(storage, _raw("SELECT current_setting('temp_directory') AS t")).read_all().to_pylist()[0]
    assert row == {"t": ""}
