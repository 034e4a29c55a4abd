"""SQL filters and limits pushed into the storage adapters (flight_server/domain/pushdown.py).

What a query may push is decided from sqlglot's tree (unit tests below); every answer through a real server
equals duckdb's answer over the same rows in memory, on duckdb, Delta and PostgreSQL - including the shapes
where nothing may be pushed (a limit over a filter the adapter cannot apply, unnest, samples, joins); and the
adapters really stream less: the matching rows only (duckdb, PostgreSQL) or no more (Delta).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dlt
import duckdb
import numpy as np
import pyarrow as pa
import pytest

from client import connect
from flight_server.domain.config import load_project
from flight_server.domain.pushdown import Predicate, applicable
from flight_server.domain.sql import check_query
from flight_server.storage import open_storage
from flight_server.testing.servers import ServerProcess, environment, wait_until

ROWS = 60_000
COLUMNS = ["id", "value", "name", "flag", "tags"]


def _pushed(sql: str) -> tuple[dict, dict]:
    query = check_query(sql, "ds", {"t": COLUMNS})
    return dict(query.pushdown.filters), dict(query.pushdown.limits)


@pytest.mark.parametrize("sql, filters, limit", [
    ("SELECT * FROM t WHERE id = 4242", [Predicate("id", "=", (4242,))], None),
    ("SELECT id, name FROM t LIMIT 10", [], 10),
    ("SELECT id FROM t WHERE id BETWEEN 10 AND 20 LIMIT 5 OFFSET 2", [Predicate("id", "between", (10, 20))], 7),
    ("SELECT * FROM t WHERE 5 < id AND name IN ('a', 'b') AND NOT flag AND value IS NOT NULL",
     [Predicate("id", ">", (5,)), Predicate("name", "in", ("a", "b")), Predicate("flag", "=", (False,)),
      Predicate("value", "not_null")], None),
    ("SELECT * FROM t WHERE ID = -3", [Predicate("id", "=", (-3,))], None),
])
def test_what_a_query_pushes(sql: str, filters: list, limit: int | None) -> None:
    got_filters, got_limits = _pushed(sql)
    assert list(got_filters.get("t", ())) == filters
    assert got_limits.get("t") == limit


@pytest.mark.parametrize("sql", [
    "SELECT * FROM t WHERE id = 1 OR id = 2 LIMIT 5",  # a disjunction: nothing
    "SELECT * FROM t a JOIN t b ON a.id = b.id WHERE a.id = 1",  # a join
    "SELECT * FROM (SELECT * FROM t) s WHERE id = 1",  # a subquery
    "SELECT * FROM t WHERE id = ? LIMIT 1",  # a parameter is no literal
    "SELECT unnest(tags) FROM t LIMIT 5",  # a set-returning call: the limit is on its output
    "SELECT DISTINCT name FROM t LIMIT 3",
    "SELECT name, count(*) FROM t GROUP BY name LIMIT 3",
    "SELECT * FROM t ORDER BY id LIMIT 3",
    "SELECT * FROM t USING SAMPLE 10 WHERE id = 1",
    "SELECT id FROM t LIMIT 10 PERCENT",  # found by review: a percentage is no row count
    "SELECT id FROM t WHERE id BETWEEN SYMMETRIC 20 AND 10 LIMIT 5",
    "SELECT * REPLACE (unnest(range(id % 3)) AS id) FROM t LIMIT 5",
    "SELECT id, k, v FROM t UNPIVOT (v FOR k IN (id, value)) WHERE v = 3 LIMIT 5",
    "SELECT * FROM t AS x(value, id) WHERE id = 3 LIMIT 1",  # a column list renames by position
    "WITH c AS (SELECT 3 AS id) SELECT id FROM c WHERE id = 3 LIMIT 1",
])
def test_no_limit_is_pushed_where_it_could_change_the_answer(sql: str) -> None:
    filters, limits = _pushed(sql)
    assert limits == {}
    if any(word in sql for word in ("OR", "JOIN", "SELECT * FROM (", "SAMPLE", "UNPIVOT", "AS x(", "WITH")):
        assert filters == {}


def test_an_adapter_applies_only_what_means_the_same_everywhere() -> None:
    schema = pa.schema([("id", pa.int64()), ("value", pa.float64()), ("name", pa.string()), ("flag", pa.bool_()),
                        ("d", pa.decimal128(10, 2))])
    given = [Predicate("id", "=", (1,)), Predicate("value", ">", (0.5,)), Predicate("name", "=", ("x",)),
             Predicate("flag", "=", (True,)), Predicate("name", ">", ("m",)),  # string order: collation-dependent
             Predicate("id", ">", (0.5,)), Predicate("d", "=", (1,))]  # an int column vs a float; decimals
    types = {"id": "bigint", "value": "double", "name": "text", "flag": "bool", "d": "decimal"}
    kept, complete = applicable(given, schema, types)
    assert kept == given[:4] and not complete
    assert applicable(given[:4], schema, types) == (given[:4], True)
    # a json column reads as text, but its engine compares JSON: no string predicates there
    assert applicable([given[2]], schema, {**types, "name": "json"}) == ([], False)
    # Delta: no float comparisons (an infinity in a file nulls its statistics, and pyarrow would skip it)
    assert applicable([given[1], Predicate("value", "is_null")], schema, types, floats=False) == (
        [Predicate("value", "is_null")], False)


# --- through a real server, on each destination -----------------------------------------------------------

def _data() -> pa.Table:
    rng = np.random.default_rng(7)
    return pa.table({
        "id": np.arange(ROWS, dtype=np.int64),
        # NaN, and one infinity (delta-rs writes such a file's statistics as nulls)
        "value": np.where(np.arange(ROWS) % 1000 == 7, np.nan, np.where(np.arange(ROWS) == 5, np.inf, rng.random(ROWS))),
        "name": pa.array([f"name_{i % 97}" for i in range(ROWS)]),
        "flag": pa.array(rng.random(ROWS) > 0.5),
    })


QUERIES = [
    "SELECT * FROM t WHERE id = 4242",
    "SELECT id, name FROM t LIMIT 10",
    "SELECT id, value FROM t WHERE id BETWEEN 1000 AND 1100",
    "SELECT name, count(*) AS n, sum(value) AS total FROM t WHERE flag AND value > 0.5 GROUP BY name ORDER BY n DESC, name LIMIT 10",
    "SELECT id FROM t WHERE name = 'name_5' AND NOT flag AND value < 0.25",
    "SELECT id FROM t WHERE name IN ('name_1', 'name_2') AND id >= 59000 LIMIT 7 OFFSET 3",
    "SELECT id FROM t WHERE id > 0.5 AND id < 20 LIMIT 5",  # an int column against a float: not pushed, nor the limit
    "SELECT id FROM t WHERE name > 'name_95' LIMIT 4",  # string order: not pushed, nor the limit
    "SELECT unnest(range(id % 3)) AS x FROM t WHERE id < 10 LIMIT 4",  # rows with no output: limit not pushed
    "SELECT count(*) AS n FROM t WHERE value IS NULL",
    "SELECT count(*) AS n FROM t WHERE value > 0.99",  # NaN rows: a pushed filter keeps what the engine keeps
    "SELECT count(*) AS n FROM t WHERE value > 0.5 AND value < 1e300",  # an infinity in one file (Delta stats)
    "SELECT id FROM t WHERE value >= 0.5 AND id < 2000 LIMIT 3000",
]


def _canonical(table: pa.Table, sql: str) -> list:
    """Rows in one order, floats to 9 digits (a sum's last bits depend on the order it adds in)."""
    rows = [{k: (("nan" if v != v else round(v, 9)) if isinstance(v, float) else v) for k, v in r.items()}
            for r in table.to_pylist()]
    return rows if "ORDER BY" in sql else sorted(rows, key=repr)


def destination_named_nums(kind: str, root: Path, request: pytest.FixtureRequest) -> tuple[str, Any, dict[str, str]]:
    """A destination ``nums`` of one kind (duckdb, delta_local, postgres) under ``root``: its line for a
    project file, the same destination for the owner's own dlt pipeline, and the environment it reads."""
    if kind == "duckdb":
        return ("nums: {type: duckdb, credentials: '{project_dir}/nums.duckdb'}",
                dlt.destinations.duckdb(str(root / "nums.duckdb")), {})
    if kind == "delta_local":
        return ("nums: {type: delta, bucket_url: '{project_dir}/lake'}", dlt.destinations.filesystem(str(root / "lake")), {})
    pg = request.getfixturevalue("postgres")
    return ("nums: {type: postgres, credentials: {host: '{env.PG_HOST}', port: '{env.PG_PORT}', "
            "username: '{env.PG_USER}', password: '{env.PG_PASSWORD}', database: '{env.PG_DATABASE}'}}",
            dlt.destinations.postgres(pg.url), dict(pg.env))


@pytest.fixture(scope="module", params=["duckdb", "delta_local", "postgres"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServerProcess, Path, dict]]:
    kind = request.param
    root = tmp_path_factory.mktemp(f"pushdown-{kind}")
    destination, owner, env = destination_named_nums(kind, root, request)
    (root / "dlt.yml").write_text(textwrap.dedent(f"""
        destinations:
          {destination}
        datasets:
          pushdown_data: {{destination: [nums]}}
        server: {{anonymous_profile: access}}
    """))
    pipeline = dlt.pipeline(f"pushdown_{kind}", destination=owner, dataset_name="pushdown_data",
                            pipelines_dir=str(root / "pipelines"))
    # several files / row groups, so that statistics can skip some
    data = _data()
    resource = dlt.resource([data.slice(i, 20_000) for i in range(0, ROWS, 20_000)], name="t",
                            table_format="delta" if kind == "delta_local" else None)
    pipeline.run(resource).raise_on_failed_jobs()
    with ServerProcess(root / "dlt.yml", env=env) as server:
        yield kind, server, root / "dlt.yml", env


@pytest.mark.parametrize("sql", QUERIES)
def test_answers_equal_duckdbs_over_the_same_rows(served: tuple, sql: str) -> None:
    kind, server, _, _ = served
    truth = duckdb.connect()
    # the sandbox's engine is duckdb over Arrow streams, which compares with Arrow's semantics where it
    # can (NaN > 0.5 is false there, though duckdb's own tables order NaN above every number): so is the truth
    truth.register("t", _data())
    expected = truth.sql(sql).to_arrow_table()
    with connect(server.url) as catalog:
        got = catalog["pushdown_data"].sql(sql).arrow()
    assert got.column_names == expected.column_names
    if "LIMIT" in sql and "ORDER BY" not in sql:  # any rows that satisfy the query
        assert got.num_rows == expected.num_rows
        check = _canonical(truth.sql(sql.split(" LIMIT ")[0]).to_arrow_table(), sql)
        assert all(row in check for row in _canonical(got, sql))
    else:
        assert _canonical(got, sql) == _canonical(expected, sql)


def test_queries_over_a_cached_table_answer_the_same(served: tuple) -> None:
    """Once ``t`` is a hot table (server.cache_bytes), a query's stream of it comes from memory, projected
    and filtered there (TableCache.sql_reader): every query still answers what duckdb does."""
    kind, server, _, _ = served
    with connect(server.url) as catalog:
        for _ in range(3):
            catalog["pushdown_data"].sql("SELECT count(*) AS n FROM t").arrow()
        if kind != "postgres":  # PostgreSQL tells no data version: its tables are not cached
            wait_until(lambda: "cached pushdown_data.t" in server.output(), "t cached", timeout=60)
        truth = duckdb.connect()
        truth.register("t", _data())
        for sql in QUERIES:
            if "LIMIT" in sql and "ORDER BY" not in sql:
                continue  # any rows may answer: compared by test_answers_equal_duckdbs_over_the_same_rows
            assert _canonical(catalog["pushdown_data"].sql(sql).arrow(), sql) == _canonical(truth.sql(sql).to_arrow_table(), sql), sql


def test_adapters_stream_only_what_the_filters_keep(served: tuple) -> None:
    kind, _, project_file, env = served
    with environment(env):
        project = load_project(project_file)
        storage = open_storage(project, project.datasets["pushdown_data"])
        try:
            point = storage.reader("t", ["id", "name"], None, where=[Predicate("id", "=", (4242,))]).read_all()
            ranged = storage.reader("t", ["id"], 3, where=[Predicate("id", "between", (100, 200))]).read_all()
            partial = storage.reader("t", ["id"], 3, where=[Predicate("id", ">", (0.5,))]).read_all()  # not applied
        finally:
            storage.close()
    if kind == "delta_local":
        # statistics: only the row group that can hold id 4242 is read (pyarrow filters its rows too)
        assert point.column("id").to_pylist() == [4242]
    else:
        assert point.to_pylist() == [{"id": 4242, "name": "name_71"}]
    assert ranged.num_rows == 3 and all(100 <= i <= 200 for i in ranged.column("id").to_pylist())
    assert partial.num_rows == ROWS  # an unusable filter streams everything, and so without the limit
