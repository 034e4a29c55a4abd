"""Issue 21, the read side: what the server serves equals what dlt's own ``dlt.dataset(destination, name)
[table].arrow()`` reads, on every destination kind, through every path (GetFlightInfo's schema, DoGet's
stream, SQL, Flight SQL's catalog) - types, NOT NULL and names under every naming convention dlt ships.

Data is made by ordinary dlt pipelines; each server is a real ``flight-share serve`` process.
"""

from __future__ import annotations

import datetime
import decimal
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import adbc_driver_flightsql.dbapi as flight_sql
import dlt
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from client import connect
from flight_server.testing.servers import ServerProcess, environment

# (slow is set per test by tests/conftest.py: every test here that starts a process or a load)

UTC = datetime.UTC
NAMINGS = ["snake_case", "sql_cs_v1", "direct", "duck_case", "sql_ci_v1"]


def _project(root: Path, datasets: str | list[str], destination: str) -> Path:
    """A flight-share project serving datasets of one destination to anonymous callers."""
    names = [datasets] if isinstance(datasets, str) else datasets
    project = root / "dlt.yml"
    project.write_text(textwrap.dedent("""\
        format_version: 1
        project: {name: reads}
        destinations:
          dest: %s
        datasets:
        %s
        profiles:
          access:
            datasets:
        %s
        server: {anonymous_profile: access}
    """) % (destination, "\n".join(f"  {n}: {{destination: [dest]}}" for n in names),
            "\n".join(f"      {n}: {{}}" for n in names)))
    return project


def _load(root: Path, destination: Any, dataset: str, data: Any, env: dict[str, str] | None = None,
          **hints: Any) -> None:
    fmt = hints.pop("loader_file_format", None)
    with environment(env or {}):
        pipeline = dlt.pipeline(f"p_{dataset}", destination=destination, dataset_name=dataset,
                                pipelines_dir=str(root / "pipelines"))
        pipeline.run(dlt.resource(data, **hints), loader_file_format=fmt).raise_on_failed_jobs()


def _flight(server: ServerProcess, dataset: str, table: str) -> tuple[pa.Schema, pa.Table]:
    """GetFlightInfo's schema and the DoGet stream of a table, with a bare pyarrow Flight client."""
    client = flight.connect(server.url)
    info = client.get_flight_info(flight.FlightDescriptor.for_path(dataset, table))
    parts = [client.do_get(e.ticket).read_all() for e in info.endpoints]
    for part in parts:
        assert part.schema.equals(info.schema), "DoGet streamed another schema than GetFlightInfo advertised"
    return info.schema, pa.concat_tables(parts) if parts else info.schema.empty_table()


def _same_types(served: pa.Schema, dlt_read: pa.Schema) -> None:
    assert [(f.name, f.type) for f in served] == [(f.name, f.type) for f in dlt_read]


# --- 1. dlt's plain filesystem layout: parquet, jsonl, csv ---------------------------------------------
ARROW_DATA = pa.table({
    "u8": pa.array([200, 1], pa.uint8()),
    "f32": pa.array([1.5, 2.5], pa.float32()),
    "ts_us": pa.array([datetime.datetime(2024, 1, 1, 1, 2, 3, 456789)] * 2, pa.timestamp("us", tz="UTC")),
    "ts_s": pa.array([datetime.datetime(2024, 1, 1, 1, 2, 3)] * 2, pa.timestamp("s")),
    "lst": pa.array([[1, 2], [3]], pa.list_(pa.int64())),
})
ROWS = [{"id": i, "name": f"n{i}", "at": datetime.datetime(2024, 5, 1, 8, 30, 0, 123456, tzinfo=UTC),
         "tags": [i, i + 1], "amount": decimal.Decimal(f"{i}.25")} for i in range(3)]


@pytest.mark.parametrize("layout", ["parquet", "jsonl", "csv"])
def test_plain_filesystem_layout_reads_as_dlt_reads_it(tmp_path: Path, layout: str) -> None:
    """Regression: a uint8 of 200 failed ("Integer value 200 not in range: 0 to 127"), float32 was served as
    double, timestamp[s]/[us] changed precision, and a jsonl list column failed ("Unsupported cast from
    string to list"): the served schema now is dlt's own read of the files."""
    lake = tmp_path / "lake"
    destination = dlt.destinations.filesystem(str(lake))
    if layout == "parquet":
        _load(tmp_path, destination, "plain", ARROW_DATA, name="t", loader_file_format=layout)
    _load(tmp_path, destination, "plain", ROWS, name="rows", loader_file_format=layout,
          columns={"tags": {"data_type": "json"}, "at": {"data_type": "timestamp", "precision": 3}})
    tables = ["t", "rows"] if layout == "parquet" else ["rows"]
    with ServerProcess(_project(tmp_path, "plain", f"{{type: filesystem, bucket_url: '{lake}'}}")) as server:
        for table in tables:
            expected = dlt.dataset(destination, "plain")[table].arrow()
            schema, got = _flight(server, "plain", table)
            _same_types(schema, expected.schema)
            assert got.to_pylist() == expected.to_pylist(), table
            with connect(server.url) as catalog:
                assert catalog["plain"][table].arrow().to_pylist() == expected.to_pylist()


# --- 2. wei, 3. NOT NULL: duckdb and PostgreSQL ------------------------------------------------------------
def _duckdb(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Callable[[], Any], str, dict[str, str]]:
    path = tmp_path / "data.duckdb"
    return (lambda: dlt.destinations.duckdb(str(path))), f"{{type: duckdb, location: '{path}'}}", {}


def _postgres(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Callable[[], Any], str, dict[str, str]]:
    pg = request.getfixturevalue("postgres")
    spec = ("{type: postgres, credentials: {host: '{env.PG_HOST}', port: '{env.PG_PORT}', username: '{env.PG_USER}', "
            "password: '{env.PG_PASSWORD}', database: '{env.PG_DATABASE}'}}")
    return (lambda: dlt.destinations.postgres(pg.url)), spec, pg.env


SQL_KINDS = {"duckdb": _duckdb, "postgres": _postgres}


@pytest.mark.parametrize("kind", list(SQL_KINDS))
def test_wei_is_one_type_on_every_path_and_not_null_is_kept(tmp_path: Path, request: pytest.FixtureRequest,
                                                             kind: str) -> None:
    """Regression: wei was decimal256(76,0) in the table's schema on PostgreSQL (dlt reads decimal(38,0)), and
    every served field was nullable though dlt stored ``nullable: false`` (``_dlt_id``, ``_dlt_load_id``, a
    NOT NULL hint). GetFlightInfo, DoGet, SQL and Flight SQL now agree, and with dlt's read."""
    destination, spec, env = SQL_KINDS[kind](tmp_path, request)
    dataset = f"wei_{kind}"
    rows = [{"id": i, "w": decimal.Decimal(10 ** 30 + i), "must": i} for i in range(3)]
    _load(tmp_path, destination(), dataset, rows, env, name="t",
          columns={"w": {"data_type": "wei"}, "must": {"data_type": "bigint", "nullable": False}})
    with ServerProcess(_project(tmp_path, dataset, spec), env=env) as server:
        schema, got = _flight(server, dataset, "t")
        assert schema.field("w").type == pa.decimal128(38, 0)
        if kind == "duckdb":  # (dlt's own read fails on PostgreSQL's numeric(156,78): it types it decimal(38,0) too)
            with environment(env):
                _same_types(schema, dlt.dataset(destination(), dataset)["t"].arrow().schema)
        assert sorted(got.column("w").to_pylist()) == [r["w"] for r in rows]
        assert {f.name for f in schema if not f.nullable} == {"must", "_dlt_id", "_dlt_load_id"}
        with connect(server.url) as catalog:
            result = catalog[dataset].sql("SELECT w, must FROM t").arrow()
            assert result.schema.field("w").type == pa.decimal128(38, 0)
        with flight_sql.connect(server.url) as conn, conn.cursor() as cur:
            cur.execute(f'SELECT w FROM "{dataset}"."t"')
            assert cur.fetch_arrow_table().schema.field("w").type == pa.decimal128(38, 0)
            table_schema = conn.adbc_get_table_schema("t", db_schema_filter=dataset)
            assert table_schema.equals(schema)


# --- 4. naming conventions ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """One PostgreSQL and one duckdb destination, a dataset per naming convention in each, one server each."""
    out: dict[str, Any] = {}
    servers = []
    try:
        for kind, make in SQL_KINDS.items():
            root = tmp_path_factory.mktemp(f"naming_{kind}")
            destination, spec, env = make(root, request)
            for naming in NAMINGS:
                with environment({"SCHEMA__NAMING": naming}):
                    _load(root, destination(), f"nm_{naming}", [{"CustomerId": 1, "FullName": "Ann Lee"},
                                                                {"CustomerId": 2, "FullName": "Bo"}], env,
                          name="Customers")
            project = _project(root, [f"nm_{n}" for n in NAMINGS], spec)
            server = ServerProcess(project, env=env)
            servers.append(server)
            out[kind] = (server, destination, env)
        yield out
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("naming", NAMINGS)
@pytest.mark.parametrize("kind", list(SQL_KINDS))
def test_every_naming_convention_serves_the_stored_names(named: dict[str, Any], kind: str, naming: str) -> None:
    """Regression (sql_cs_v1 on PostgreSQL): ``SELECT "FullName" FROM "Customers"`` failed with 'Referenced column
    "FullName" not found' (the sandbox's column pruning folded names to lower case). Reads, SQL (sandbox and, on
    PostgreSQL, the warehouse) and the Flight SQL catalog use the stored names."""
    server, destination, env = named[kind]
    dataset = f"nm_{naming}"
    with environment(env):
        ds = dlt.dataset(destination(), dataset)
        table = next(t for t in ds.schema.data_table_names())
        expected = ds[table].arrow()
    id_col, name_col = expected.schema.names[:2]
    with connect(server.url) as catalog:
        assert list(catalog[dataset].tables) == [table]
        got = catalog[dataset][table].arrow()
        assert got.schema.names == expected.schema.names
        assert got.to_pylist() == expected.to_pylist()
        result = catalog[dataset].sql(f'SELECT "{name_col}" FROM "{table}" WHERE "{id_col}" = 2').arrow()
        assert result.to_pylist() == [{name_col: "Bo"}]
        star = catalog[dataset].sql(f'SELECT * FROM "{table}"').arrow()
        assert star.schema.names == expected.schema.names
    with flight_sql.connect(server.url) as conn, conn.cursor() as cur:
        objects = conn.adbc_get_objects(depth="columns", db_schema_filter=dataset).read_all().to_pylist()
        tables = [t for c in objects for s in c["catalog_db_schemas"] for t in s["db_schema_tables"]]
        assert [(t["table_name"], [c["column_name"] for c in t["table_columns"]]) for t in tables] == \
            [(table, expected.schema.names)]
        cur.execute(f'SELECT "{name_col}" FROM "{dataset}"."{table}" ORDER BY "{id_col}"')
        assert cur.fetch_arrow_table().column(name_col).to_pylist() == ["Ann Lee", "Bo"]


def test_columns_differing_only_in_case_are_read_and_refused_in_sql_with_a_reason(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """sql_cs_v1 on PostgreSQL may store ``FullName`` and ``fullname`` in one table: the table read serves both;
    duckdb (the SQL sandbox) cannot tell them apart, so SQL that needs both is refused instead of answering
    with ``fullname_1`` or the other column's values; SQL over one of them works."""
    destination, spec, env = _postgres(tmp_path, request)
    with environment({"SCHEMA__NAMING": "sql_cs_v1"}):
        _load(tmp_path, destination(), "twins", [{"Id": 1, "FullName": "Upper", "fullname": "lower"}], env, name="T")
    with ServerProcess(_project(tmp_path, "twins", spec), env=env) as server, connect(server.url) as catalog:
        assert catalog["twins"]["T"].arrow().select(["FullName", "fullname"]).to_pylist() == \
            [{"FullName": "Upper", "fullname": "lower"}]
        assert catalog["twins"].sql('SELECT "fullname" FROM "T"').arrow().to_pylist() == [{"fullname": "lower"}]
        with pytest.raises(Exception, match="differ only in letter case"):
            catalog["twins"].sql('SELECT * FROM "T"').arrow()
