"""Every read operation on every destination, against real servers.

Destinations: the embedded duckdb file, Delta Lake on a local folder, Delta Lake on S3 (a real
moto_server), PostgreSQL (a real server). For each one the demo events are loaded with
``flight_server.cli.demo.load_demo`` (dlt), a real ``flight-share serve`` process is started over a project
file that points at it (secrets only through ``{env.NAME}``), and the real client checks the catalog,
schemas against streams, row counts against the generator, projection and limits, SQL with a join,
errors — and that no secret shows up in any output, error text or server log.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from client import NotFoundError, ServerUnavailableError, connect
from client.errors import FlightShareError
from flight_server.cli.demo import CHILD_TABLES, EVENT_TABLES, generate_pages, load_demo
from flight_server.domain.config import ConfigError, load_project
from flight_server.storage import open_storage
from flight_server.testing.servers import REPO, ServerProcess, environment

EVENTS = 500  # as the session's duckdb demo project (tests/conftest.py)
SEED = 42
ALL_TABLES = [*EVENT_TABLES, *CHILD_TABLES]
KINDS = ["duckdb", "delta_local", "delta_s3", "postgres"]
S3_POSTGRES = REPO / "configs" / "s3_postgres" / "dlt.yml"


def source_counts(events: int = EVENTS, seed: int = SEED) -> dict[str, int]:
    """Rows per table straight from the generator (what dlt must have loaded)."""
    counts: Counter[str] = Counter()
    for page in generate_pages(events, seed):
        for table, records in page.items():
            counts[table] += len(records)
            for record in records:
                payload = record.get("payload") or {}
                if table == "push_event":
                    counts["push_event__payload__commits"] += len(payload.get("commits") or [])
                if table == "gollum_event":
                    counts["gollum_event__payload__pages"] += len(payload.get("pages") or [])
    return dict(counts)


EXPECTED = source_counts()


@dataclass
class Prepared:
    """A project over one destination with the demo events loaded into github_events_dataset."""

    kind: str
    project: Path
    env: dict[str, str] = field(default_factory=dict)
    location: str = ""  # the masked location print(catalog) must show for github_events_dataset
    secrets: tuple[str, ...] = ()


_prepared: dict[str, Prepared] = {}


def load_events(project_file: Path, env: dict[str, str], dataset: str = "github_events_dataset") -> None:
    """The demo events into ``dataset`` through the adapter's own dlt destination."""
    with environment(env):
        project = load_project(project_file)
        storage = open_storage(project, project.datasets[dataset])
        try:
            load_demo(storage.dlt_destination(), dataset, events=EVENTS, seed=SEED,
                      pipelines_dir=str(project.data_dir / "pipelines"),
                      table_format=storage.destination_config.table_format)
        finally:
            storage.close()


def prepare(kind: str, request: pytest.FixtureRequest) -> Prepared:
    if kind in _prepared:
        return _prepared[kind]
    tmp = request.getfixturevalue("tmp_path_factory").mktemp(kind)
    if kind == "duckdb":
        project = request.getfixturevalue("demo_project")  # loaded by `flight-share demo` (cli)
        lake = project.parent / "_data" / "lake.duckdb"
        prepared = Prepared(kind, project, location=f"duckdb:///{str(lake).lstrip('/')}")
    elif kind == "delta_local":
        project = tmp / "dlt.yml"
        text = (REPO / "configs" / "demo" / "dlt.yml").read_text()
        text = text.replace("    type: duckdb\n    location: _data/lake.duckdb",
                            "    type: filesystem\n    bucket_url: _data/lake\n    table_format: delta")
        text = text.replace("destination: [warehouse]", "destination: [lake]")  # an empty Delta dataset too
        project.write_text(text)
        load_events(project, {})
        prepared = Prepared(kind, project, location=f"file://{tmp / '_data' / 'lake'}/")
    else:
        s3 = request.getfixturevalue("s3")
        pg = request.getfixturevalue("postgres")
        env = {**s3.env, **pg.env}
        project = tmp / "dlt.yml"
        text = S3_POSTGRES.read_text()
        if kind == "postgres":
            text = text.replace("github_events_dataset:\n    destination: [delta_lake]",
                                "github_events_dataset:\n    destination: [warehouse]")
            location = f"postgres://{pg.user}:***@{pg.host}:{pg.port}/{pg.database}"
        else:
            location = f"s3://{s3.bucket}/lake_1/"
        project.write_text(text)
        load_events(project, env)
        prepared = Prepared(kind, project, env, location, (s3.secret_key, s3.access_key, pg.password))
    _prepared[kind] = prepared
    return prepared


@dataclass
class Served:
    prepared: Prepared
    server: ServerProcess

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module", params=KINDS)
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    prepared = prepare(request.param, request)
    if prepared.kind == "duckdb":
        # the session's server over the demo project (duckdb allows one process per file)
        yield Served(prepared, request.getfixturevalue("server"))
        return
    with ServerProcess(prepared.project, env=prepared.env) as proc:
        yield Served(prepared, proc)
        assert proc.alive, f"the server died during the tests:\n{proc.output()}"


def assert_no_secret(text: str, secrets: tuple[str, ...]) -> None:
    for secret in secrets:
        assert secret not in text


# --- through a real server and the real client -----------------------------------------------------
def test_print_catalog_shows_masked_locations(served: Served) -> None:
    with connect(served.url) as catalog:
        text = str(catalog)
        lines = text.splitlines()
        assert lines[0] == "Datasets in project dlt_example_project for profile access:"
        assert lines[1] == f"github_events_dataset@{catalog.github_events_dataset.info.destination}[{served.prepared.location}]"
        assert lines[2].startswith("reports_dataset@")
        for rendered in (text, repr(catalog), catalog._repr_html_(), str(catalog.github_events_dataset)):
            assert_no_secret(rendered, served.prepared.secrets)


def test_tables_are_listed_and_empty_dataset_has_none(served: Served) -> None:
    with connect(served.url) as catalog:
        ds = catalog.github_events_dataset
        assert sorted(ds.tables) == sorted(ALL_TABLES)
        assert ds.info.schema_name == "events" and ds.info.schema_version and ds.info.schema_version >= 1
        assert str(ds).splitlines()[0] == f"Dataset github_events_dataset tables in logical schema events@v{ds.info.schema_version}"
        assert catalog.reports_dataset.tables == []


def test_every_table_streams_its_advertised_schema_and_all_rows(served: Served) -> None:
    with connect(served.url) as catalog:
        ds = catalog.github_events_dataset
        for name in ALL_TABLES:
            table = ds[name]
            advertised = table.schema
            data = table.arrow()
            # exactly what GetFlightInfo/GetSchema advertise: names, order, types, nullability, metadata
            assert data.schema.equals(advertised, check_metadata=True), (name, data.schema, advertised)
            assert data.num_rows == EXPECTED[name] == table.row_count(), name
        created = ds.push_event.select("created_at").arrow().column("created_at")
        assert created.type == pa.timestamp("us", tz="UTC")


def test_select_and_limit(served: Served) -> None:
    with connect(served.url) as catalog:
        push = catalog.github_events_dataset.push_event
        small = push.select("id", "created_at").limit(3)
        data = small.arrow()
        assert data.column_names == ["id", "created_at"] and data.num_rows == 3
        assert data.schema.equals(small.schema, check_metadata=True)
        assert push.select("_dlt_id").limit(0).arrow().num_rows == 0
        assert push.limit(10_000).arrow().num_rows == EXPECTED["push_event"]
        ids = push.select("id").arrow().column("id").to_pylist()
        assert len(ids) == len(set(ids)) == EXPECTED["push_event"]


def test_sql_aggregates_and_joins(served: Served) -> None:
    with connect(served.url) as catalog:
        ds = catalog.github_events_dataset
        rel = ds.sql("SELECT payload__action AS action, count(*) AS n FROM issues_event GROUP BY 1 ORDER BY 1")
        data = rel.arrow()
        assert data.column_names == ["action", "n"] and rel.schema.names == ["action", "n"]
        assert sum(data.column("n").to_pylist()) == EXPECTED["issues_event"]
        joined = ds.sql(
            "SELECT count(*) AS n, count(DISTINCT p.id) AS pushes FROM push_event p "
            "JOIN push_event__payload__commits c ON c._dlt_parent_id = p._dlt_id"
        ).arrow()
        assert joined.column("n")[0].as_py() == EXPECTED["push_event__payload__commits"]
        assert 0 < joined.column("pushes")[0].as_py() <= EXPECTED["push_event"]
        cte = ds.sql(
            "WITH w AS (SELECT id FROM watch_event) SELECT count(*) AS n FROM w"
        ).arrow()
        assert cte.column("n")[0].as_py() == EXPECTED["watch_event"]
        first = ds.sql("SELECT min(created_at) AS first FROM push_event").arrow()
        assert pa.types.is_timestamp(first.schema.field("first").type)
        expected_first = min(r["created_at"] for p in generate_pages(EVENTS, SEED) for r in p.get("push_event", []))
        assert first.column("first")[0].as_py() == expected_first


def test_missing_table_is_not_found(served: Served) -> None:
    with connect(served.url) as catalog:
        ds = catalog.github_events_dataset
        with pytest.raises(NotFoundError) as err:
            ds["no_such_table"]
        assert err.value.table == "no_such_table"
        with pytest.raises(NotFoundError) as err:
            ds.sql("SELECT * FROM no_such_table").arrow()
        assert "no_such_table" in str(err.value)
        with pytest.raises(NotFoundError):
            ds.push_event.select("no_such_column").arrow()
    client = flight.connect(served.url)
    with pytest.raises(pa.ArrowKeyError) as raw:
        client.get_flight_info(flight.FlightDescriptor.for_path("github_events_dataset", "no_such_table"))
    assert "Table 'no_such_table' not found in dataset 'github_events_dataset'" in str(raw.value)


def test_plain_flight_client_reads_every_endpoint(served: Served) -> None:
    client = flight.connect(served.url)
    infos = list(client.list_flights(b"github_events_dataset"))
    assert len(infos) == len(ALL_TABLES)
    for info in infos:
        data = client.do_get(info.endpoints[0].ticket).read_all()
        assert data.schema.equals(info.schema) and data.num_rows == client.get_flight_info(info.descriptor).total_records


def test_errors_and_server_log_hold_no_secret(served: Served) -> None:
    secrets = served.prepared.secrets
    with connect(served.url) as catalog:
        ds = catalog.github_events_dataset
        for bad in ("SELECT no_such_column FROM push_event", "SELECT * FROM push_event WHERE created_at > 'not a time'"):
            with pytest.raises(FlightShareError) as err:
                ds.sql(bad).arrow()
            assert_no_secret(str(err.value), secrets)
            assert "Traceback" not in str(err.value)
    assert served.server.alive
    assert_no_secret(served.server.output(), secrets)


# --- PostgreSQL: a wrong password leaks nowhere ---------------------------------------------------------
def test_postgres_wrong_password_is_unavailable_and_not_echoed(postgres, s3, tmp_path: Path) -> None:
    wrong = "wrong-" + postgres.password[::-1]
    env = {**s3.env, **postgres.env, "PG_PASSWORD": wrong}
    project = tmp_path / "dlt.yml"
    shutil.copy(S3_POSTGRES, project)
    with ServerProcess(project, env=env) as proc:
        with connect(proc.url) as catalog:
            listing = str(catalog)  # the catalog still lists; the dataset says why it cannot be read
            assert "reports_dataset@warehouse" in listing and "(unavailable)" in listing
            assert_no_secret(listing, (wrong, postgres.password, s3.secret_key))
            with pytest.raises(ServerUnavailableError) as err:
                catalog.reports_dataset
        message = str(err.value)
        assert "password authentication failed" in message
        assert_no_secret(message, (wrong, postgres.password, s3.secret_key))
        assert proc.alive
        assert_no_secret(proc.output(), (wrong, postgres.password, s3.secret_key))


# --- the adapters in-process: streaming, pooling, pushdown --------------------------------------------
def _storage(prepared: Prepared, dataset: str = "github_events_dataset"):
    with environment(prepared.env):
        project = load_project(prepared.project)
    return open_storage(project, project.datasets[dataset])


def test_postgres_connections_return_to_the_pool_after_partial_and_unread_streams(request: pytest.FixtureRequest) -> None:
    storage = _storage(prepare("postgres", request))
    try:
        assert storage.row_count("push_event") == EXPECTED["push_event"]
        pool = storage.pool()
        assert pool._idle.qsize() == 1
        for _ in range(5):
            unread = storage.reader("push_event", None, None)
            del unread
            partial = storage.reader("push_event__payload__commits", ["sha"], None)
            partial.read_next_batch()
            del partial
            projected = storage.reader("push_event", ["id"], 0)
            assert projected.schema.names == ["id"]
            del projected
            gc.collect()
        assert pool._idle.qsize() == 1  # the same connection, reused every time
        # nothing was left in a transaction or half-read: the pooled connection answers at once
        assert storage.row_count("push_event") == EXPECTED["push_event"]
        assert pool._idle.qsize() == 1
    finally:
        storage.close()


@pytest.mark.parametrize("kind", ["delta_local", "delta_s3"])
def test_delta_reads_with_projection_and_limits(request: pytest.FixtureRequest, kind: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import flight_server.storage.delta as delta

    storage = _storage(prepare(kind, request))
    try:
        uri = storage.table_uri("push_event")
        assert uri.startswith("file://" if kind == "delta_local" else "s3://")
        dt = storage.delta_table("push_event")
        assert storage.row_count("push_event") == EXPECTED["push_event"] == dt.count()
        reader = storage.reader("push_event", ["id", "created_at"], None)
        assert reader.schema.names == ["id", "created_at"]
        assert reader.read_all().num_rows == EXPECTED["push_event"]
        head = storage.reader("push_event", ["id"], 7).read_all()
        assert head.num_rows == 7
        monkeypatch.setattr(delta, "HEAD_LIMIT_ROWS", 5)  # a limit past it streams through duckdb
        streamed = storage.reader("push_event", ["id", "created_at"], 50)
        gc.collect()
        data = streamed.read_all()
        assert data.num_rows == 50 and data.schema.equals(storage.arrow_schema("push_event", ["id", "created_at"]))
    finally:
        storage.close()


def test_delta_sees_a_new_load_without_restart(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A second load (by another process, e.g. a writer replica) is visible on the next read."""
    project = tmp_path / "dlt.yml"
    shutil.copy(prepare("delta_local", request).project, project)
    load_events(project, {})
    storage = _storage(Prepared("delta_local", project))
    try:
        first = storage.row_count("push_event")
        assert first == EXPECTED["push_event"]
        version = storage.delta_table("push_event").version()
        load_events(project, {})  # replace: same rows again, a new Delta version
        assert storage.delta_table("push_event").version() > version
        assert storage.row_count("push_event") == first
    finally:
        storage.close()


# --- project file validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "destination, key, text",
    [
        ("{type: filesystem, bucket_url: data/lake, table_format: iceberg}", "destinations.x.table_format", "supported: delta"),
        ("{type: postgres, table_format: delta}", "destinations.x.table_format", "only a filesystem destination"),
        ("{type: postgres, location: 'postgres://h/db'}", "destinations.x.location", "given by 'credentials'"),
        ("{type: postgres, credentials: [1, 2]}", "destinations.x.credentials", "connection string or a mapping"),
    ],
)
def test_destination_config_errors(tmp_path: Path, destination: str, key: str, text: str) -> None:
    project = tmp_path / "dlt.yml"
    project.write_text(
        f"format_version: 1\nproject: {{name: p}}\ndestinations:\n  x: {destination}\ndatasets:\n  d: {{destination: x}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_project(project)
    assert err.value.key == key and text in str(err.value) and str(project) in str(err.value)


def test_s3_postgres_config_reads_every_secret_from_the_environment(s3, postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    text = S3_POSTGRES.read_text()
    assert "{env.PG_PASSWORD}" in text and "{env.AWS_SECRET_ACCESS_KEY}" in text
    assert postgres.password not in text and s3.secret_key not in text
    for name in {**s3.env, **postgres.env}:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as err:
        load_project(S3_POSTGRES)
    assert "is not set" in str(err.value)
    with environment({**s3.env, **postgres.env}):
        project = load_project(S3_POSTGRES)
    lake, warehouse = project.destinations["delta_lake"], project.destinations["warehouse"]
    assert lake.type == "filesystem" and lake.table_format == "delta" and lake.location == f"s3://{s3.bucket}/lake_1"
    assert warehouse.type == "postgres" and warehouse.credentials["password"] == postgres.password
    assert re.fullmatch(r"postgres://loader:\*\*\*@127\.0\.0\.1:\d+/dlt_data", open_storage(project, project.datasets["reports_dataset"]).location)


# --- every dlt data type: advertised schema == streamed schema ----------------------------------------
def _typed_rows() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import datetime
    import decimal

    row = {
        "i": 1, "f": 1.5, "d": decimal.Decimal("12.345"), "t": "x", "b": True,
        "ts": datetime.datetime(2024, 1, 1, 12, 30, tzinfo=datetime.UTC),
        "dt": datetime.date(2024, 1, 2), "tm": datetime.time(3, 4, 5), "bin": b"\x00\x01",
        "js": {"a": [1, 2]}, "w": decimal.Decimal(10**20), "n": None,
    }
    columns = {"js": {"data_type": "json"}, "tm": {"data_type": "time"}, "bin": {"data_type": "binary"},
               "w": {"data_type": "wei"}, "n": {"data_type": "text", "nullable": True}}
    return [row, {**row, "i": 2, "n": "y"}], columns


@pytest.mark.parametrize("kind", ["delta_local", "postgres"])
def test_every_dlt_type_streams_as_advertised(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> None:
    import dlt

    from flight_server.domain.config import DatasetConfig

    prepared = prepare(kind, request)
    with environment(prepared.env):
        project = load_project(prepared.project)
    destination = project.datasets["github_events_dataset"].destination
    # a dataset of its own that no project lists, so no served catalog sees it change
    project = dataclasses.replace(project, datasets={"types_dataset": DatasetConfig("types_dataset", (destination,))})
    storage = open_storage(project, project.datasets["types_dataset"])
    rows, columns = _typed_rows()
    try:
        resource = dlt.resource(rows, name="all_types", columns=columns,
                                table_format=storage.destination_config.table_format)
        with environment(prepared.env):
            pipeline = dlt.pipeline(pipeline_name="types", pipelines_dir=str(tmp_path / "pipelines"),
                                    destination=storage.dlt_destination(), dataset_name="types_dataset")
            pipeline.run(resource, write_disposition="replace").raise_on_failed_jobs()
        storage.invalidate()
        advertised = storage.arrow_schema("all_types")
        data = storage.reader("all_types", None, None).read_all()
        assert data.schema.equals(advertised, check_metadata=True), (data.schema, advertised)
        assert data.num_rows == 2 == storage.row_count("all_types")
        got = {r["i"]: r for r in data.to_pylist()}
        assert got[2]["n"] == "y" and got[1]["n"] is None and got[1]["bin"] == b"\x00\x01"
        assert got[1]["dt"] == rows[0]["dt"] and got[1]["ts"] == rows[0]["ts"]
        assert str(got[1]["d"]).startswith("12.345") and int(got[1]["w"]) == 10**20
        projected = storage.reader("all_types", ["w", "tm"], 1).read_all()
        assert projected.schema.equals(storage.arrow_schema("all_types", ["w", "tm"]))
        assert max(r["t"] for r in data.to_pylist()) == "x"
    finally:
        storage.close()
