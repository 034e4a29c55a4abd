"""Every save operation on every real destination: Delta Lake on a local folder, Delta Lake on S3 (a real
moto_server) and PostgreSQL (a real server) — the duckdb default is covered by tests/test_write_path.py.

Per destination one ``flight-share serve`` process runs over a project like the seed's (a frozen
``github_events_dataset`` holding the demo events, ``reports_dataset`` with new tables allowed but
columns and types frozen, an ``open_dataset`` with dlt's default, and one per discard mode). Every
refused save is checked to have left nothing behind: no pending package, no rows, no new table or
column, the same schema version and no new ``_dlt_loads`` record — also for a save that fails only
at dlt's *load* step, after dlt had already stored its new schema version.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dlt
import pandas as pd
import pyarrow as pa
import pytest

from client import (
    Catalog,
    DataValidationError,
    InvalidRequestError,
    PipelineStepFailed,
    connect,
)
from client.errors import FlightShareError
from flight_server.cli.demo import load_demo
from flight_server.domain.config import load_project
from flight_server.storage import open_storage
from flight_server.testing.servers import ServerProcess, environment, save_folders_left
from tests.test_write_path import (  # the documented texts, defined once
    FROZEN_COLUMN,
    FROZEN_TABLE,
)

KINDS = ["delta_local", "delta_s3", "postgres"]
EVENTS = 120


DATASETS = """
datasets:
  github_events_dataset: {destination: [store]}
  reports_dataset: {destination: [store], schema_name: out_source}
  open_dataset: {destination: [store]}
  discard_row_dataset: {destination: [store]}
  discard_value_dataset: {destination: [store]}
profiles:
  access:
    datasets:
      github_events_dataset: {contract: freeze}
      reports_dataset:
        contract: {tables: evolve, columns: freeze, data_type: freeze}
      open_dataset: {}
      discard_row_dataset:
        contract: {columns: discard_row, data_type: discard_row}
      discard_value_dataset:
        contract: {columns: discard_value, data_type: discard_value}
server: {profile: access}
"""

DESTINATIONS = {
    "delta_local": "  store: {type: filesystem, bucket_url: _data/lake, table_format: delta}\n",
    "delta_s3": (
        "  store:\n"
        "    type: filesystem\n"
        "    bucket_url: s3://{env.S3_BUCKET}/{env.LAKE_PREFIX}\n"
        "    table_format: delta\n"
        "    credentials:\n"
        "      aws_access_key_id: \"{env.AWS_ACCESS_KEY_ID}\"\n"
        "      aws_secret_access_key: \"{env.AWS_SECRET_ACCESS_KEY}\"\n"
        "      endpoint_url: \"{env.S3_ENDPOINT_URL}\"\n"
        "      region_name: \"{env.S3_REGION}\"\n"
    ),
    "postgres": (
        "  store:\n"
        "    type: postgres\n"
        "    credentials:\n"
        "      host: \"{env.PG_HOST}\"\n"
        "      port: \"{env.PG_PORT}\"\n"
        "      username: \"{env.PG_USER}\"\n"
        "      password: \"{env.PG_PASSWORD}\"\n"
        "      database: \"{env.PG_DATABASE}\"\n"
    ),
}


@dataclass
class Destination:
    """A served project over one destination kind, and direct access to what it stored."""

    kind: str
    project: Path
    server: ServerProcess
    env: dict[str, str] = field(default_factory=dict)
    postgres_url: str | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def catalog(self) -> Catalog:
        return connect(self.url)

    def pipelines_left(self) -> list[str]:
        """Pipeline folders the server left behind (pending packages would live there)."""
        return save_folders_left(self.project)

    @contextlib.contextmanager
    def storage(self, dataset: str) -> Iterator[Any]:
        """The dataset's adapter in this process (reads the destination directly, not the server)."""
        with environment(self.env):
            project = load_project(self.project)
            storage = open_storage(project, project.datasets[dataset])
            try:
                yield storage
            finally:
                storage.close()

    def completed_loads(self, dataset: str) -> int:
        """Load packages recorded in the dataset's ``_dlt_loads`` at the destination."""
        if self.kind == "postgres":
            import psycopg2

            with contextlib.closing(psycopg2.connect(self.postgres_url)) as con, con.cursor() as cur:
                cur.execute(f'SELECT count(*) FROM "{dataset}"."_dlt_loads"')
                return int(cur.fetchone()[0])
        with self.storage(dataset) as storage:
            stored = storage.stored_schema()
            client = storage._dlt_client(stored.schema)
            return len(client.list_table_files("_dlt_loads"))

    def add_check_constraint(self, dataset: str, table: str, name: str, column: str) -> None:
        """A constraint the destination itself enforces (``column > 0``), added behind dlt's back."""
        if self.kind == "postgres":
            import psycopg2

            with contextlib.closing(psycopg2.connect(self.postgres_url)) as con:
                con.autocommit = True
                with con.cursor() as cur:
                    cur.execute(f'ALTER TABLE "{dataset}"."{table}" ADD CONSTRAINT {name} CHECK ({column} > 0)')
            return
        with self.storage(dataset) as storage:
            storage.delta_table(table).alter.add_constraint({name: f"{column} > 0"})


def _load_events(project: Path, env: dict[str, str]) -> None:
    with environment(env):
        config = load_project(project)
        storage = open_storage(config, config.datasets["github_events_dataset"])
        try:
            load_demo(storage.dlt_destination(), "github_events_dataset", events=EVENTS, seed=7,
                      pipelines_dir=str(config.data_dir / "demo"), table_format=storage.destination_config.table_format)
        finally:
            storage.close()


@pytest.fixture(scope="module", params=KINDS)
def dest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Destination]:
    kind = request.param
    folder = tmp_path_factory.mktemp(f"writes-{kind}")
    env: dict[str, str] = {}
    postgres_url = None
    if kind == "delta_s3":
        s3 = request.getfixturevalue("s3")
        env = {**s3.env, "LAKE_PREFIX": f"writes_{uuid.uuid4().hex[:8]}"}
    elif kind == "postgres":
        pg = request.getfixturevalue("postgres")
        database = f"writes_{uuid.uuid4().hex[:8]}"  # a database of its own: dataset names as in the seed
        pg._admin(f"CREATE DATABASE {database} OWNER {pg.user}")
        env = {**pg.env, "PG_DATABASE": database}
        postgres_url = pg.url.rsplit("/", 1)[0] + "/" + database
    project = folder / "dlt.yml"
    project.write_text("format_version: 1\nproject: {name: dlt_example_project}\ndestinations:\n"
                       + DESTINATIONS[kind] + DATASETS)
    _load_events(project, env)
    with ServerProcess(project, env=env) as server:
        yield Destination(kind, project, server, env, postgres_url)
        assert server.alive, f"the server died during the tests:\n{server.output()}"


def _sorted(table: pa.Table) -> pa.Table:
    """Rows in a fixed order: by dlt's row id where the table has one (dict loads), else by every column
    that sorts (tables saved from Arrow have no _dlt_id, as with dlt's own pipeline.run(arrow))."""
    if "_dlt_id" in table.column_names:
        return table.sort_by("_dlt_id")
    keys = [f.name for f in table.schema if not pa.types.is_nested(f.type)]
    return table.sort_by([(k, "ascending") for k in keys]) if keys else table


def refused_without_trace(dest: Destination, dataset: str, table: str, save: Callable[[], Any],
                          error: type[BaseException] = PipelineStepFailed) -> BaseException:
    """Run a save that must be refused; check it left the dataset exactly as it was."""
    catalog = dest.catalog()
    ds = catalog[dataset]
    version = ds.info.schema_version
    tables = list(ds.tables)
    before = ds[table].arrow() if table in tables else None
    loads = dest.completed_loads(dataset) if version is not None else 0
    with pytest.raises(error) as refused:
        save()
    ds.refresh()
    assert ds.info.schema_version == version, "a refused save changed the schema version"
    assert ds.tables == tables, "a refused save changed the tables"
    if before is not None:
        after = ds[table].arrow()
        assert after.schema.equals(before.schema), "a refused save changed the columns"
        assert _sorted(after).equals(_sorted(before)), "a refused save changed the rows"
    if version is not None:
        assert dest.completed_loads(dataset) == loads, "a refused save recorded a load"
    assert dest.pipelines_left() == [], "a refused save left a pipeline (and its packages) behind"
    return refused.value


def test_the_seed_workflow(dest: Destination) -> None:
    """Read events, aggregate, save to reports; frozen table and frozen column are refused, nothing written."""
    catalog = dest.catalog()
    issues = catalog.github_events_dataset.issues_event.df()
    reports_df = issues.groupby("payload__action").size().reset_index(name="n")

    info = catalog.reports_dataset.save(reports_df, table_name="aggregated_issues")
    lines = str(info).splitlines()
    assert lines[0].startswith("Pipeline save_aggregated_issues_pipeline load step completed in ")
    assert lines[1] == "1 load package(s) were loaded to destination store and into dataset reports_dataset"
    # the destination by its name, never its address (review 22, F7: "postgres://loader:***@127.0.0.1:...")
    assert lines[2] == f"The {info.destination_type} destination 'store' stored the data"
    assert info.location == "store" and catalog.reports_dataset.info.location not in str(info.to_json())
    assert lines[3] == f"Load package {info.load_ids[0]} is LOADED and contains no failed jobs"
    assert info.rows == len(reports_df)
    stored = catalog.reports_dataset.aggregated_issues.df().sort_values("payload__action")
    assert stored["n"].tolist() == reports_df.sort_values("payload__action")["n"].tolist()
    assert catalog.reports_dataset.info.schema_name == "out_source"

    failed = refused_without_trace(
        dest, "github_events_dataset", "aggregated_issues",
        lambda: dest.catalog().github_events_dataset.save(reports_df, table_name="aggregated_issues"))
    assert isinstance(failed, PipelineStepFailed) and failed.step == "extract"
    assert str(failed.__cause__) == FROZEN_TABLE
    assert failed.__cause__.schema_entity == "tables" and failed.__cause__.contract_mode == "freeze"

    with_id = catalog.reports_dataset.aggregated_issues.df()
    with_id["id"] = 1
    failed = refused_without_trace(
        dest, "reports_dataset", "aggregated_issues",
        lambda: dest.catalog().reports_dataset.save(with_id, table_name="aggregated_issues"))
    assert str(failed.__cause__) == FROZEN_COLUMN and failed.__cause__.column_name == "id"

    failed = refused_without_trace(
        dest, "reports_dataset", "aggregated_issues",
        lambda: dest.catalog().reports_dataset.save(
            pd.DataFrame({"payload__action": ["x"], "n": ["many"]}), table_name="aggregated_issues"))
    assert isinstance(failed.__cause__, DataValidationError)
    assert (failed.__cause__.schema_entity, failed.__cause__.column_name) == ("data_type", "n")


def test_evolve_replace_and_merge(dest: Destination) -> None:
    ds = dest.catalog().open_dataset
    ds.save(pd.DataFrame({"id": [1, 2], "v": ["a", "b"]}), table_name="evolving")
    version = ds.info.schema_version
    ds.save(pd.DataFrame({"id": [3], "v": ["c"], "more": [1.5]}), table_name="evolving")
    assert ds.info.schema_version == version + 1
    data = ds.evolving.arrow().sort_by("id")
    assert data.column("more").to_pylist() == [None, None, 1.5]
    assert data.column("v").to_pylist() == ["a", "b", "c"]

    ds.save(pd.DataFrame({"id": [9], "v": ["z"]}), table_name="evolving", write_disposition="replace")
    data = ds.evolving.arrow()
    assert data.column("id").to_pylist() == [9] and data.column("more").to_pylist() == [None]

    ds.save(pd.DataFrame({"id": [1, 2], "v": ["a", "b"]}), table_name="merged", write_disposition="merge", primary_key="id")
    ds.save(pd.DataFrame({"id": [2, 3], "v": ["B", "c"]}), table_name="merged", write_disposition="merge", primary_key="id")
    merged = ds.merged.arrow().sort_by("id")
    assert merged.column("id").to_pylist() == [1, 2, 3] and merged.column("v").to_pylist() == ["a", "B", "c"]
    # a compound key
    ds.save(pd.DataFrame({"k1": [1, 1], "k2": ["x", "y"], "v": [1, 2]}), table_name="compound",
            write_disposition="merge", primary_key=["k1", "k2"])
    ds.save(pd.DataFrame({"k1": [1], "k2": ["y"], "v": [20]}), table_name="compound",
            write_disposition="merge", primary_key=["k1", "k2"])
    assert sorted(ds.compound.select("k2", "v").arrow().to_pylist(), key=lambda r: r["k2"]) == [
        {"k2": "x", "v": 1}, {"k2": "y", "v": 20}]
    # a null in the key is refused by dlt before anything is loaded
    refused_without_trace(
        dest, "open_dataset", "merged",
        lambda: dest.catalog().open_dataset.save(pd.DataFrame({"id": [None, 7.0], "v": ["n", "o"]}),
                                                 table_name="merged", write_disposition="merge", primary_key="id"),
        InvalidRequestError)
    assert dest.pipelines_left() == []


def test_a_changed_type_under_evolve_is_cast_to_the_stored_type_or_refused(dest: Destination) -> None:
    """dlt would write the new type into the stored schema but leave the Arrow data (and the
    destination's column) as it is: the load then fails after the schema was stored, or the schema
    no longer says what is stored. flight-share casts to the stored type instead."""
    ds = dest.catalog().open_dataset
    ds.save(pd.DataFrame({"id": [1, 2], "x": [1.5, 2.5]}), table_name="typed")
    version = ds.info.schema_version
    ds.save(pd.DataFrame({"id": [3.0], "x": [4]}), table_name="typed")  # double into bigint, bigint into double
    data = ds.typed.arrow().sort_by("id")
    assert data.schema.field("id").type == pa.int64() and data.schema.field("x").type == pa.float64()
    assert data.column("id").to_pylist() == [1, 2, 3] and data.column("x").to_pylist() == [1.5, 2.5, 4.0]
    assert ds.info.schema_version == version
    failed = refused_without_trace(
        dest, "open_dataset", "typed",
        lambda: dest.catalog().open_dataset.save(pd.DataFrame({"id": ["four"], "x": [1.0]}), table_name="typed"),
        InvalidRequestError)
    assert "column 'id' of table 'typed' is stored as bigint" in str(failed) and "nothing was written" in str(failed)
    refused_without_trace(
        dest, "open_dataset", "typed",
        lambda: dest.catalog().open_dataset.save(pd.DataFrame({"id": [4.5], "x": [1.0]}), table_name="typed"),
        InvalidRequestError)


def test_a_save_failing_at_the_load_step_leaves_the_schema_version_as_it_was(dest: Destination) -> None:
    """The destination refuses the rows (a CHECK constraint) after dlt stored a new schema version
    with a new column: the version is removed again, no rows, no load record, no package."""
    ds = dest.catalog().open_dataset
    ds.save(pd.DataFrame({"id": [1, 2], "n": [1, 2]}), table_name="checked")
    dest.add_check_constraint("open_dataset", "checked", "n_positive", "n")
    failed = refused_without_trace(
        dest, "open_dataset", "checked",
        lambda: dest.catalog().open_dataset.save(pd.DataFrame({"id": [3], "n": [-1], "extra": ["x"]}),
                                                 table_name="checked"),
        FlightShareError)
    assert "failed at step load" in str(failed) and "nothing was written" in str(failed)
    assert "extra" not in dest.catalog().open_dataset.checked.schema.names
    # the next save with the same new column goes through (the destination may hold the empty column)
    ds = dest.catalog().open_dataset
    version = ds.info.schema_version
    ds.save(pd.DataFrame({"id": [4], "n": [4], "extra": ["y"]}), table_name="checked")
    data = ds.checked.arrow().sort_by("id")
    assert data.column("id").to_pylist() == [1, 2, 4] and data.column("extra").to_pylist() == [None, None, "y"]
    assert ds.info.schema_version == version + 1
    assert dest.pipelines_left() == []


def test_discard_row_and_discard_value(dest: Destination) -> None:
    catalog = dest.catalog()
    base = pd.DataFrame({"k": ["a", "b"], "n": [1, 2]})
    for name in ("discard_row_dataset", "discard_value_dataset"):
        catalog[name].save(base, table_name="t")
        catalog[name].save(pd.DataFrame({"k": ["c"], "n": [3], "extra": ["x"]}), table_name="t")
    rows = catalog.discard_row_dataset.t.arrow()
    assert "extra" not in rows.column_names and sorted(rows.column("k").to_pylist()) == ["a", "b"]
    values = catalog.discard_value_dataset.t.arrow()
    assert "extra" not in values.column_names and sorted(values.column("k").to_pylist()) == ["a", "b", "c"]


def test_saved_tables_are_read_back_by_sql_and_counted(dest: Destination) -> None:
    ds = dest.catalog().open_dataset
    frame = pd.DataFrame({"g": [i % 3 for i in range(3000)], "v": list(range(3000))})
    ds.save(frame, table_name="grouped")
    assert ds.grouped.row_count() == 3000
    out = ds.sql("SELECT g, count(*) AS n, sum(v) AS s FROM grouped GROUP BY g ORDER BY g").arrow().to_pylist()
    expected = frame.groupby("g")["v"].agg(["count", "sum"])
    assert [(r["g"], r["n"], int(r["s"])) for r in out] == [(g, int(c), int(s)) for g, (c, s) in expected.iterrows()]


# --- issue 11: a failed replace keeps the previous table, its child tables and the schema version -----
EVENTS_CHILD = "push_event__payload__commits"


def _rows(dest: Destination, table: str) -> pa.Table:
    return dest.catalog().github_events_dataset[table].arrow().sort_by("_dlt_id")


def test_a_replace_with_a_value_that_does_not_fit_is_refused_before_anything_is_touched(dest: Destination) -> None:
    """uint64 is stored as bigint, so the frozen contract passes; the value does not fit: refused up
    front naming the column (it used to fail at the load step after dlt had emptied the tables)."""
    child = _rows(dest, EVENTS_CHILD)
    assert child.num_rows > 0
    overflow = pa.table({"id": ["x"], "repo__id": pa.array([2**64 - 1], pa.uint64())})
    failed = refused_without_trace(
        dest, "github_events_dataset", "push_event",
        lambda: dest.catalog().github_events_dataset.save(overflow, table_name="push_event",
                                                          write_disposition="replace"),
        InvalidRequestError)
    assert "column 'repo__id' of table 'push_event'" in str(failed) and "nothing was written" in str(failed)
    assert _rows(dest, EVENTS_CHILD).equals(child)


def test_a_replace_failing_at_the_load_step_keeps_the_table_and_its_child_tables(dest: Destination) -> None:
    """The destination itself refuses the new rows (a CHECK constraint added behind dlt's back, so no
    up-front check knows): PostgreSQL rolls back the staged TRUNCATE + INSERT, Delta tables are
    restored to their previous version; the child table keeps its rows too."""
    child = _rows(dest, EVENTS_CHILD)
    dest.add_check_constraint("github_events_dataset", "push_event", "repo_positive", "repo__id")
    rows = pa.table({"id": ["a", "b"], "repo__id": pa.array([5, -1], pa.int64())})
    failed = refused_without_trace(
        dest, "github_events_dataset", "push_event",
        lambda: dest.catalog().github_events_dataset.save(rows, table_name="push_event", write_disposition="replace"),
        FlightShareError)
    text = str(failed)
    assert "failed at step load" in text and "nothing was written" in text
    assert "The above exception" not in text and "pipeline.load()" not in text
    assert _rows(dest, EVENTS_CHILD).equals(child), "a failed replace changed the child table"
    # a good replace goes through and, as dlt's replace does, empties the child table
    dest.catalog().github_events_dataset.save(rows.slice(0, 1), table_name="push_event", write_disposition="replace")
    assert _rows(dest, "push_event").column("id").to_pylist() == ["a"]
    assert _rows(dest, EVENTS_CHILD).num_rows == 0


def test_a_delta_replace_failing_after_its_commits_restores_every_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection, in-process: dlt's Delta replace has committed - the child table emptied, the
    table overwritten - and then the load fails (recording the load in ``_dlt_loads``). Both tables
    are restored to their previous versions and the schema version stays."""
    import sys
    import threading

    from dlt.destinations.impl.filesystem.filesystem import FilesystemClient

    from flight_server.transport.server import FlightShareServer

    project = tmp_path / "dlt.yml"
    project.write_text("format_version: 1\nproject: {name: dlt_example_project}\ndestinations:\n"
                       + DESTINATIONS["delta_local"] + DATASETS)
    _load_events(project, {})
    limit = getattr(sys, "tracebacklimit", None)
    server = FlightShareServer(load_project(project), "grpc://127.0.0.1:0", open_storage)
    threading.Thread(target=server.serve, daemon=True).start()
    try:
        url = f"grpc://127.0.0.1:{server.port}"
        ds = connect(url).github_events_dataset
        before = {t: ds[t].arrow().sort_by("_dlt_id") for t in ("push_event", EVENTS_CHILD)}
        version = ds.info.schema_version
        assert before[EVENTS_CHILD].num_rows > 0
        calls: list[str] = []

        def failing_complete_load(self: Any, load_id: str) -> None:
            calls.append(load_id)
            raise RuntimeError("injected: the store went away while recording the load")

        monkeypatch.setattr(FilesystemClient, "complete_load", failing_complete_load)
        rows = pa.table({"id": ["a"], "repo__id": pa.array([5], pa.int64())})
        with pytest.raises(FlightShareError) as failed:
            connect(url).github_events_dataset.save(rows, table_name="push_event", write_disposition="replace")
        assert calls, "the fault was not injected"
        assert "nothing was written" in str(failed.value) and "The above exception" not in str(failed.value)
        ds = connect(url).github_events_dataset
        for table, data in before.items():
            assert ds[table].arrow().sort_by("_dlt_id").equals(data), f"{table} was not restored"
        assert ds.info.schema_version == version
        monkeypatch.undo()
        connect(url).github_events_dataset.save(rows, table_name="push_event", write_disposition="replace")
        assert connect(url).github_events_dataset.push_event.arrow().column("id").to_pylist() == ["a"]
    finally:
        server.shutdown()
        sys.tracebacklimit = limit if limit is not None else 1000


def _physical_tables(dest: Destination, dataset: str) -> set[str]:
    """The tables that exist at the destination, whatever the stored schema says."""
    if dest.kind == "postgres":
        import psycopg2

        with contextlib.closing(psycopg2.connect(dest.postgres_url)) as con, con.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (dataset,))
            return {r[0] for r in cur.fetchall()}
    with dest.storage(dataset) as storage:
        stored = storage.stored_schema()
        client = storage._dlt_client(stored.schema if stored is not None else dlt.Schema("probe"))
        root = client.dataset_path
        if not client.fs_client.exists(root):
            return set()  # nothing was ever written into the dataset's folder
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in client.fs_client.ls(root, detail=False)}


def test_a_failed_save_into_a_new_table_leaves_no_table_behind(dest: Destination) -> None:
    """The load fails after dlt created the new table (a timestamp the destination cannot hold): the
    table is removed again, and a later save to the same name goes through."""
    bad = pa.table({"k": [1], "ts": pa.array([10**13], pa.timestamp("s"))})
    with pytest.raises(FlightShareError, match="nothing was written"):
        dest.catalog().open_dataset.save(bad, table_name="stamps_new")
    assert "stamps_new" not in dest.catalog().open_dataset.tables
    assert "stamps_new" not in _physical_tables(dest, "open_dataset")
    dest.catalog().open_dataset.save(pa.table({"k": [2], "ts": pa.array([0], pa.timestamp("s"))}),
                                     table_name="stamps_new")
    assert dest.catalog().open_dataset.stamps_new.arrow().column("k").to_pylist() == [2]
    assert dest.pipelines_left() == []


def test_concurrent_saves_and_reads_queue_and_all_succeed(dest: Destination) -> None:
    """Issue 22 item 0 on every destination kind: four clients saving into one dataset at once (three saves
    each, two of them into one table), while two others read and run SQL. Every save succeeds (they queue
    in arrival order), every row is there once, and the readers never see an error."""
    table = f"busy_{uuid.uuid4().hex[:6]}"
    dest.catalog()["open_dataset"].save(pa.table({"client": [-1], "i": [0]}), table)
    errors: list[BaseException] = []
    done = threading.Event()

    def saver(client: int) -> None:
        try:
            with connect(dest.server.url) as catalog:
                for round_ in range(3):
                    rows = pa.table({"client": [client] * 100, "i": list(range(round_ * 100, round_ * 100 + 100))})
                    catalog["open_dataset"].save(rows, table if client < 2 else f"{table}_{client}")
        except BaseException as exc:  # noqa: BLE001 - the outcome under test
            errors.append(exc)

    def reader(sql: bool) -> None:
        with connect(dest.server.url) as catalog:
            while not done.is_set():
                try:
                    if sql:
                        catalog["open_dataset"].sql(f"SELECT count(*) AS n FROM {table}").arrow()
                    else:
                        catalog["open_dataset"][table].arrow()
                except BaseException as exc:  # noqa: BLE001 - the outcome under test
                    errors.append(exc)
                    return

    savers = [threading.Thread(target=saver, args=(k,)) for k in range(4)]
    readers = [threading.Thread(target=reader, args=(sql,)) for sql in (False, True)]
    for thread in [*readers, *savers]:
        thread.start()
    for thread in savers:
        thread.join(600)
    done.set()
    for thread in readers:
        thread.join(120)
    assert errors == []
    catalog = dest.catalog()
    shared = catalog["open_dataset"][table].arrow()
    assert sorted(zip(shared["client"].to_pylist(), shared["i"].to_pylist())) == \
        [(-1, 0)] + [(c, i) for c in (0, 1) for i in range(300)]
    for client in (2, 3):
        own = catalog["open_dataset"][f"{table}_{client}"].arrow()
        assert sorted(own["i"].to_pylist()) == list(range(300)) and set(own["client"].to_pylist()) == {client}
    assert dest.pipelines_left() == []
