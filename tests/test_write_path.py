"""Write-back through contracts, against a real server process per test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pytest

from client import (
    DataValidationError,
    InvalidRequestError,
    LoadInfo,
    PermissionDeniedError,
    PipelineStepFailed,
    connect,
    protocol,
)
from flight_server.domain import faults
from flight_server.testing.servers import REPO, ServerProcess, make_project, save_folders_left

FROZEN_TABLE = (
    "In schema: events: In Schema: events Table: aggregated_issues. Contract on tables with mode freeze is violated. "
    "Trying to add table aggregated_issues but new tables are frozen."
)
FROZEN_COLUMN = (
    "In schema: out_source: In Schema: out_source Table: aggregated_issues Column: id. Contract on columns with mode "
    "freeze is violated. Trying to add column id to table aggregated_issues but columns are frozen."
)


@pytest.fixture(scope="session")  # read-only, copied per test: no module state, so xdist may spread the tests
def loaded_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("write-src"), REPO / "tests" / "write_project.yml", events=300)


class WriteServer:
    """A fresh copy of the loaded project and a server over it."""

    def __init__(self, source: Path, folder: Path, server_settings: str = "{profile: access}",
                 env: dict[str, str] | None = None) -> None:
        shutil.copytree(source.parent, folder)
        self.project = folder / "dlt.yml"
        text = self.project.read_text().replace("server: {profile: access}", f"server: {server_settings}")
        self.project.write_text(text)
        self.data = folder / "_data"
        self.proc = ServerProcess(self.project, env=env)
        self.url = self.proc.url

    def pipelines_left(self) -> list[str]:
        """Pipeline folders the server left behind (pending packages would live there)."""
        return save_folders_left(self.project)

    def stop_and_inspect(self, file: str, sql: str) -> list[tuple] | None:
        """Stop the server and query a destination file directly (None: no save ever created the file)."""
        self.proc.stop()
        if not (self.data / file).exists():
            return None
        with duckdb.connect(str(self.data / file), read_only=True) as con:
            return con.execute(sql).fetchall()


@pytest.fixture()
def ws(loaded_project: Path, tmp_path: Path) -> Iterator[WriteServer]:
    server = WriteServer(loaded_project, tmp_path / "project")
    yield server
    assert server.proc.alive or server.proc.proc.returncode is not None
    server.proc.stop()


def aggregate_issues(df: pd.DataFrame) -> pd.DataFrame:
    return df.groupby("payload__action").size().reset_index(name="n")


def test_the_seed_workflow(ws: WriteServer) -> None:
    """Read issues_event, aggregate, save to reports (ok), to events (frozen table), add id (frozen column)."""
    catalog = connect(ws.url)
    df = catalog.github_events_dataset.issues_event.df()
    reports_df = aggregate_issues(df)

    info = catalog.reports_dataset.save(reports_df, table_name="aggregated_issues")
    lines = str(info).splitlines()
    assert lines[0].startswith("Pipeline save_aggregated_issues_pipeline load step completed in ")
    assert lines[0].endswith(" seconds")
    assert lines[1] == "1 load package(s) were loaded to destination warehouse and into dataset reports_dataset"
    # the destination by its name, never its address (the server's file path, a connection string)
    assert lines[2] == "The duckdb destination 'warehouse' stored the data"
    assert info.location == "warehouse" and str(ws.data) not in json.dumps(info.to_json())
    assert lines[3] == f"Load package {info.load_ids[0]} is LOADED and contains no failed jobs"
    assert info.rows == len(reports_df)
    assert str(catalog.reports_dataset).splitlines() == ["Dataset reports_dataset tables in logical schema out_source@v2", "aggregated_issues"]

    events_before = catalog.github_events_dataset.info.schema_version
    with pytest.raises(PipelineStepFailed) as failed:
        catalog.github_events_dataset.save(reports_df, table_name="aggregated_issues")
    text = str(failed.value)
    assert text.startswith("Pipeline execution failed at stage extract when processing package ")
    assert text.endswith(f"with exception:\n\n<class 'dlt.common.schema.exceptions.DataValidationError'>\n{FROZEN_TABLE}")
    inner = failed.value.__cause__
    assert isinstance(inner, DataValidationError) and str(inner) == FROZEN_TABLE
    assert (inner.schema_name, inner.table_name, inner.column_name, inner.schema_entity, inner.contract_mode) == (
        "events", "aggregated_issues", None, "tables", "freeze")
    assert failed.value.load_id and failed.value.step == "extract"
    assert "aggregated_issues" not in catalog.github_events_dataset.refresh().tables
    assert catalog.github_events_dataset.info.schema_version == events_before

    reports_df = catalog.reports_dataset.aggregated_issues.df()
    reports_df["id"] = 1
    with pytest.raises(PipelineStepFailed) as failed:
        catalog.reports_dataset.save(reports_df, table_name="aggregated_issues")
    assert str(failed.value.__cause__) == FROZEN_COLUMN
    assert failed.value.__cause__.column_name == "id"
    after = catalog.reports_dataset.aggregated_issues.arrow()
    assert "id" not in after.column_names and after.num_rows == len(reports_df)
    assert catalog.reports_dataset.info.schema_version == 2
    assert ws.pipelines_left() == []
    loads = ws.stop_and_inspect("warehouse.duckdb", "SELECT status FROM reports_dataset._dlt_loads")
    assert loads == [(0,)]  # one load package, complete; no failed or pending ones


def test_data_type_freeze(ws: WriteServer) -> None:
    catalog = connect(ws.url)
    catalog.reports_dataset.save(pd.DataFrame({"k": ["a"], "n": [1]}), table_name="typed")
    with pytest.raises(PipelineStepFailed) as failed:
        catalog.reports_dataset.save(pd.DataFrame({"k": ["b"], "n": ["one"]}), table_name="typed")
    inner = failed.value.__cause__
    assert inner.schema_entity == "data_type" and inner.column_name == "n"
    assert str(inner) == (
        "In schema: out_source: In Schema: out_source Table: typed Column: n. Contract on data_type with mode freeze "
        "is violated. Trying to change data type of column n in table typed from bigint to text but data types are frozen."
    )
    assert (inner.existing_data_type, inner.incoming_data_type) == ("bigint", "text")
    assert catalog.reports_dataset.typed.arrow().column("k").to_pylist() == ["a"]
    assert ws.pipelines_left() == []


def test_discard_row_and_discard_value(ws: WriteServer) -> None:
    catalog = connect(ws.url)
    base = pd.DataFrame({"k": ["a", "b"], "n": [1, 2]})
    for name in ("discard_row_dataset", "discard_value_dataset"):
        catalog[name].save(base, table_name="t")
        catalog[name].save(pd.DataFrame({"k": ["c"], "n": [3], "extra": ["x"]}), table_name="t")
    rows = catalog.discard_row_dataset.t.arrow()
    assert "extra" not in rows.column_names
    assert sorted(rows.column("k").to_pylist()) == ["a", "b"]  # the row with a new column was dropped
    values = catalog.discard_value_dataset.t.arrow()
    assert "extra" not in values.column_names
    assert sorted(values.column("k").to_pylist()) == ["a", "b", "c"]  # the row kept, the value dropped


def test_discard_row_on_tables_drops_a_new_table_silently(ws: WriteServer) -> None:
    catalog = connect(ws.url)
    info = catalog.no_new_tables_dataset.save(pd.DataFrame({"k": [1]}), table_name="brand_new")
    assert isinstance(info, LoadInfo)
    assert "brand_new" not in catalog.no_new_tables_dataset.refresh().tables


def test_no_contract_means_dlt_default_evolve(ws: WriteServer) -> None:
    catalog = connect(ws.url)
    catalog.open_dataset.save(pd.DataFrame({"k": [1]}), table_name="t")
    catalog.open_dataset.save(pd.DataFrame({"k": [2], "more": ["x"]}), table_name="t")
    table = catalog.open_dataset.t.arrow().sort_by("k")
    assert table.column("more").to_pylist() == [None, "x"]
    assert catalog.open_dataset.info.schema_version >= 3


def test_replace_and_merge(ws: WriteServer) -> None:
    catalog = connect(ws.url)
    ds = catalog.open_dataset
    ds.save(pd.DataFrame({"id": [1, 2], "v": ["a", "b"]}), table_name="r")
    ds.save(pd.DataFrame({"id": [3], "v": ["c"]}), table_name="r", write_disposition="replace")
    assert ds.r.arrow().column("id").to_pylist() == [3]
    ds.save(pd.DataFrame({"id": [1, 2], "v": ["a", "b"]}), table_name="m", write_disposition="merge", primary_key="id")
    ds.save(pd.DataFrame({"id": [2, 3], "v": ["B", "c"]}), table_name="m", write_disposition="merge", primary_key="id")
    merged = ds.m.arrow().sort_by("id")
    assert merged.column("id").to_pylist() == [1, 2, 3] and merged.column("v").to_pylist() == ["a", "B", "c"]
    ds.save(pd.DataFrame({"id": [3], "v": ["C"]}), table_name="m", write_disposition="merge")  # the stored key
    assert ds.m.arrow().sort_by("id").column("v").to_pylist() == ["a", "B", "C"]
    with pytest.raises(InvalidRequestError, match="primary_key"):
        ds.save(pd.DataFrame({"id": [1]}), table_name="r", write_disposition="merge")  # r stores no key


def test_large_multi_batch_put(ws: WriteServer) -> None:
    catalog = connect(ws.url)
    n = 100_000
    table = pa.table({"i": pa.array(range(n), pa.int64()), "s": pa.array([f"row{i % 97}" for i in range(n)]),
                      "f": pa.array([i / 3 for i in range(n)])})
    batches = table.to_batches(max_chunksize=7_000)
    assert len(batches) > 10
    info = catalog.open_dataset.save(batches, table_name="big")
    assert info.rows == n
    back = catalog.open_dataset.big.select("i", "s", "f").arrow().sort_by("i")
    assert back.column("i").to_pylist() == list(range(n))
    assert back.column("s").equals(table.column("s"))


def test_two_clients_put_into_one_table_at_once(ws: WriteServer) -> None:
    errors: list[BaseException] = []

    def put(offset: int) -> None:
        try:
            frame = pd.DataFrame({"i": range(offset, offset + 20_000)})
            connect(ws.url).open_dataset.save(frame, table_name="shared")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(k * 20_000,)) for k in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    ids = connect(ws.url).open_dataset.shared.select("i").arrow().column("i").to_pylist()
    assert sorted(ids) == list(range(40_000))


def test_concurrent_saves_into_one_dataset_queue_and_all_succeed(ws: WriteServer) -> None:
    """Regression (issue 22): four clients saving at once, three saves each, while another reads: half the
    saves failed after 10 s - a save waiting for the duckdb file held the schema cache's lock that the save
    inside its write window needed. Saves queue in arrival order now, and every one succeeds."""
    connect(ws.url).open_dataset.save(pa.table({"client": [-1], "i": [0]}), table_name="busy")
    errors: list[BaseException] = []
    done = threading.Event()

    def saver(client: int) -> None:
        try:
            for round_ in range(3):
                rows = pa.table({"client": [client] * 200, "i": list(range(round_ * 200, round_ * 200 + 200))})
                connect(ws.url).open_dataset.save(rows, table_name="busy")
                # and a new table of its own each round: schema changes of several saves at once
                connect(ws.url).open_dataset.save(rows, table_name=f"busy_{client}_{round_}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader() -> None:
        catalog = connect(ws.url)
        while not done.is_set():
            try:
                catalog.open_dataset.busy.arrow()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    threads = [threading.Thread(target=saver, args=(k,)) for k in range(4)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    [t.start() for t in threads]
    [t.join() for t in threads]
    done.set()
    watcher.join()
    assert errors == []
    data = connect(ws.url).open_dataset.busy.arrow()
    assert data.num_rows == 1 + 4 * 3 * 200
    assert sorted(pc.value_counts(data.column("client")).to_pylist(), key=lambda c: c["values"]) == \
        [{"values": -1, "counts": 1}] + [{"values": k, "counts": 600} for k in range(4)]
    catalog = connect(ws.url)
    for k in range(4):
        for round_ in range(3):
            own = catalog.open_dataset[f"busy_{k}_{round_}"].arrow()
            assert sorted(own.column("i").to_pylist()) == list(range(round_ * 200, round_ * 200 + 200))


def test_reads_never_wait_on_saves_and_see_the_last_committed_data(loaded_project: Path, tmp_path: Path) -> None:
    """Regression (issue 22 §4): readers of a duckdb dataset got UNAVAILABLE "the duckdb file ... is busy with
    a save; retry" while saves held the file. A save is held inside its write window (the test-only fault
    point ``load``, dlt's load step about to run on the read-write connection) while reads, SQL and the
    catalog go on: they see the last committed data, then the save completes and is seen whole."""
    release = tmp_path / "release"
    ws = WriteServer(loaded_project, tmp_path / "project", env={faults.VARIABLE: f"load:hold:{release}"})
    try:
        catalog = connect(ws.url)
        release.touch()  # the first save creates the table without a pause
        catalog.open_dataset.save(pa.table({"i": [0]}), table_name="busy")
        release.unlink()
        outcome: list[object] = []
        saving = threading.Thread(target=lambda: outcome.append(
            connect(ws.url).open_dataset.save(pa.table({"i": list(range(1, 50_001))}), table_name="busy")))
        saving.start()
        held = ws.project.parent / ".flight-share" / "puts"
        try:
            for _ in range(3):  # three rounds of every kind of read, all during the save
                assert connect(ws.url).open_dataset.busy.arrow().column("i").to_pylist() == [0]
                assert catalog.open_dataset.sql("SELECT count(*) AS n FROM busy").arrow().column("n")[0].as_py() == 1
                assert "busy" in catalog.open_dataset.refresh().tables
            assert saving.is_alive() and any(held.iterdir())  # the save was still inside its write window
        finally:
            release.touch()
            saving.join(120)
        assert isinstance(outcome[0], LoadInfo)
        assert catalog.open_dataset.busy.arrow().num_rows == 50_001
    finally:
        ws.proc.stop()


# a save id reused for a different save, and what the refusal names
CHANGES: list[tuple[dict[str, Any], str]] = [
    ({"write_disposition": "replace"}, "write disposition"),
    ({"write_disposition": "merge", "primary_key": "i"}, "write disposition and primary key"),
    ({"data": pa.table({"i": [1, 2, 3], "j": ["a", "b", "c"]})}, "columns"),
    ({"data": pa.table({"i": [9]})}, "row count"),
]


def test_a_save_sent_again_with_its_save_id_is_stored_once_and_a_different_one_is_refused(ws: WriteServer) -> None:
    """Issue 22 §4: a client whose answer was lost sends the save again with the same save id; the server
    answers as the first time and stores nothing more. The same id for another table is another save.
    Regression (review 22, F6): the same id sent with another write disposition, key, columns or row count was
    answered with the first save's LoadInfo ("LOADED") and nothing of it was stored; it is refused
    (INVALID_ARGUMENT, naming what differs) and stores nothing."""
    rows = pa.table({"i": [1, 2, 3]})
    dataset = connect(ws.url).open_dataset
    first = dataset.save(rows, table_name="once", save_id="abc-1")
    again = connect(ws.url).open_dataset.save(rows, table_name="once", save_id="abc-1")
    assert again.load_ids == first.load_ids and again.rows == 3
    assert connect(ws.url).open_dataset.once.arrow().num_rows == 3
    other = dataset.save(rows, table_name="twice", save_id="abc-1")
    assert other.load_ids != first.load_ids and connect(ws.url).open_dataset.twice.arrow().num_rows == 3
    for change, differs in CHANGES:
        with pytest.raises(InvalidRequestError) as refused:
            dataset.save(**{"data": rows, "table_name": "once", "save_id": "abc-1", **change})
        assert str(refused.value).startswith(
            f"save_id abc-1 was already used for a different save to 'open_dataset.once' (another {differs}); "
            "choose a new id; nothing was written"), change
    assert connect(ws.url).open_dataset.once.arrow().column("i").to_pylist() == [1, 2, 3]
    assert dataset.save(rows, table_name="once", save_id="abc-1").load_ids == first.load_ids  # still the same
    dataset.save(rows, table_name="once")  # a new save (a fresh id)
    assert connect(ws.url).open_dataset.once.arrow().num_rows == 6
    with pytest.raises(InvalidRequestError, match="save_id"):
        dataset.save(rows, table_name="once", save_id="not/allowed")


def test_read_only_profile_gets_permission_denied(ws: WriteServer) -> None:
    catalog = connect(ws.url)
    with pytest.raises(PermissionDeniedError) as denied:
        catalog.readonly_dataset.save(pd.DataFrame({"k": [1]}), table_name="t")
    assert denied.value.dataset == "readonly_dataset" and denied.value.profile == "access"
    assert "may read but not write dataset 'readonly_dataset'" in str(denied.value)
    assert catalog.readonly_dataset.refresh().tables == []
    # the raw Flight status is PERMISSION_DENIED with the fields as JSON
    client = flight.connect(ws.url)
    writer, _ = client.do_put(flight.FlightDescriptor.for_path("readonly_dataset", "t"), pa.schema([("k", pa.int64())]))
    with pytest.raises(flight.FlightUnauthorizedError) as raw:
        writer.write_table(pa.table({"k": [1]}))
        writer.close()
    assert json.loads(raw.value.extra_info)["fields"]["profile"] == "access"


def test_plain_pyarrow_put_with_a_path_descriptor(ws: WriteServer) -> None:
    client = flight.connect(ws.url)
    table = pa.table({"x": [1, 2, 3]})
    writer, results = client.do_put(flight.FlightDescriptor.for_path("open_dataset", "plain"), table.schema)
    writer.write_table(table)
    writer.done_writing()
    answer = json.loads(results.read().to_pybytes())
    writer.close()
    assert answer["load_info"]["rows"] == 3 and answer["load_info"]["pipeline_name"] == "save_plain_pipeline"
    assert connect(ws.url).open_dataset.plain.arrow().column("x").to_pylist() == [1, 2, 3]


def test_frozen_table_over_the_wire_carries_fields(ws: WriteServer) -> None:
    client = flight.connect(ws.url)
    writer, _ = client.do_put(flight.FlightDescriptor.for_path("github_events_dataset", "aggregated_issues"),
                              pa.schema([("n", pa.int64())]))
    with pytest.raises(flight.FlightUnauthorizedError) as raw:
        writer.write_table(pa.table({"n": [1]}))
        writer.close()
    detail = json.loads(raw.value.extra_info)
    assert detail["error"] == "ContractViolation" and detail["message"] == FROZEN_TABLE
    assert detail["fields"]["schema_entity"] == "tables" and detail["fields"]["contract_mode"] == "freeze"
    assert str(raw.value).startswith(FROZEN_TABLE)


_DISCONNECTING_CLIENT = """
import os, sys, pyarrow as pa, pyarrow.flight as flight
client = flight.connect(sys.argv[1])
batch = pa.record_batch({"i": pa.array(range(50_000), pa.int64())})
writer, _ = client.do_put(flight.FlightDescriptor.for_path("open_dataset", "vanishing"), batch.schema)
for _ in range(20):
    writer.write_batch(batch)
os._exit(0)  # vanish mid-stream: no done_writing, no close
"""


def test_client_that_disconnects_mid_stream_writes_nothing(ws: WriteServer) -> None:
    subprocess.run([sys.executable, "-c", _DISCONNECTING_CLIENT, ws.url], check=True, timeout=60)
    catalog = connect(ws.url)
    # the server is still up and the upload left no table, no schema change and no package
    import time

    # the put ends on the server some time after the client vanished (its audit line says so); only then
    # is there something to check - before, the folder may not even exist yet (this test was flaky)
    deadline = time.monotonic() + 60
    while '"rpc": "do_put"' not in ws.proc.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert '"rpc": "do_put"' in ws.proc.output(), ws.proc.output()[-3000:]
    while ws.pipelines_left() != [] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "vanishing" not in catalog.open_dataset.refresh().tables
    assert ws.pipelines_left() == [], ws.proc.output()[-3000:]
    catalog.open_dataset.save(pd.DataFrame({"i": [1]}), table_name="after")
    assert catalog.open_dataset.after.arrow().num_rows == 1
    assert ws.proc.alive


def test_failures_leave_no_pending_packages(ws: WriteServer) -> None:
    catalog = connect(ws.url)
    catalog.open_dataset.save(pd.DataFrame({"k": [1]}), table_name="ok")
    catalog.reports_dataset.save(pd.DataFrame({"n": [1]}), table_name="t1")
    failing = [
        lambda: catalog.github_events_dataset.save(pd.DataFrame({"n": [1]}), table_name="t1"),  # frozen table
        lambda: catalog.reports_dataset.save(pd.DataFrame({"n": [1], "x": [2]}), table_name="t1"),  # frozen column
        lambda: catalog.reports_dataset.save(pd.DataFrame({"n": [1.5]}), table_name="t1"),  # frozen data type
    ]
    for save in failing:
        with pytest.raises(PipelineStepFailed):
            save()
        assert ws.pipelines_left() == []
    # a later good save is not blocked by a stale package
    info = catalog.open_dataset.save(pd.DataFrame({"k": [2]}), table_name="ok")
    assert info.rows == 1 and sorted(catalog.open_dataset.ok.arrow().column("k").to_pylist()) == [1, 2]
    loads = ws.stop_and_inspect("warehouse.duckdb", "SELECT count(*), min(status), max(status) FROM open_dataset._dlt_loads")
    assert loads == [(2, 0, 0)]


def test_bad_write_requests(ws: WriteServer) -> None:
    catalog = connect(ws.url)
    with pytest.raises(InvalidRequestError, match="reserved for dlt"):
        catalog.open_dataset.save(pd.DataFrame({"k": [1]}), table_name="_dlt_loads")
    with pytest.raises(TypeError, match="cannot save a str"):
        catalog.open_dataset.save("not data", table_name="t")  # type: ignore[arg-type]
    client = flight.connect(ws.url)
    writer, _ = client.do_put(flight.FlightDescriptor.for_path("nope_dataset", "t"), pa.schema([("k", pa.int64())]))
    with pytest.raises(pa.ArrowKeyError, match="Dataset 'nope_dataset' not found"):
        writer.write_table(pa.table({"k": [1]}))
        writer.close()
    assert ws.proc.alive


def test_put_over_the_size_limit_is_refused_and_writes_nothing(loaded_project: Path, tmp_path: Path) -> None:
    ws = WriteServer(loaded_project, tmp_path / "project", "{profile: access, max_put_bytes: 200000}")
    try:
        catalog = connect(ws.url)
        small = pa.table({"i": pa.array(range(1000), pa.int64())})
        catalog.open_dataset.save(small, table_name="limited")
        big = pa.table({"i": pa.array(range(100_000), pa.int64())})  # 800 KB
        with pytest.raises(InvalidRequestError, match="exceeds the server's limit of 200000 bytes"):
            catalog.open_dataset.save(big, table_name="limited")
        assert catalog.open_dataset.limited.row_count() == 1000
        assert ws.pipelines_left() == []
        assert ws.proc.alive
    finally:
        ws.proc.stop()


def test_a_source_failing_half_way_stores_nothing(ws: WriteServer) -> None:
    """The client's data source raises after some batches: the upload has no commit marker, nothing lands."""
    catalog = connect(ws.url)
    schema = pa.schema([("i", pa.int64())])

    def batches():
        for k in range(5):
            yield pa.record_batch([pa.array(range(k * 1000, (k + 1) * 1000), pa.int64())], schema=schema)
        raise RuntimeError("the source broke at row 5000")

    with pytest.raises(RuntimeError, match="the source broke at row 5000"):
        catalog.open_dataset.save(pa.RecordBatchReader.from_batches(schema, batches()), table_name="half")
    assert "half" not in catalog.open_dataset.refresh().tables
    assert ws.pipelines_left() == []
    # a raw client that ends the stream normally without the marker it announced stores nothing either
    client = flight.connect(ws.url)
    command = protocol.encode_command(protocol.WriteCommand("open_dataset", "half", commit_marker=True))
    writer, _ = client.do_put(flight.FlightDescriptor.for_command(command), schema)
    writer.write_batch(pa.record_batch([pa.array([1], pa.int64())], schema=schema))
    with pytest.raises(pa.ArrowInvalid, match="ended without the client.s commit"):
        writer.close()
    assert "half" not in catalog.open_dataset.refresh().tables
    assert ws.proc.alive


def test_merge_twice_into_a_dataset_with_frozen_data_types(ws: WriteServer) -> None:
    """The primary key's hints (NOT NULL) are dlt's, not a data-type change: the second merge is accepted."""
    catalog = connect(ws.url)
    frame = pd.DataFrame({"day": ["mon", "tue"], "n": [1, 2]})
    catalog.reports_dataset.save(frame, table_name="daily", write_disposition="merge", primary_key="day")
    catalog.reports_dataset.save(pd.DataFrame({"day": ["tue"], "n": [5]}), table_name="daily",
                                 write_disposition="merge", primary_key="day")
    merged = catalog.reports_dataset.daily.arrow().sort_by("day")
    assert merged.column("day").to_pylist() == ["mon", "tue"] and merged.column("n").to_pylist() == [1, 5]
