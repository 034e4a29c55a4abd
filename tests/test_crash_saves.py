"""A save is all-or-nothing across a crash, and a retried save is stored once (issue 22 §4).

``kill -9`` of the server during a save (1M rows into duckdb) left the rows committed with a ``_dlt_load_id``
missing from ``_dlt_loads``; the client got UNAVAILABLE and its retry stored the rows twice. Here a real
server process kills itself (SIGKILL, the test-only fault points of :mod:`flight_server.domain.faults`) at
each point of a save's load step, on every destination kind the save tests use:

- ``load``: in the write window, before dlt's load step;
- ``loads-record``: dlt's data jobs committed, its ``_dlt_loads`` record not yet written;
- ``loaded``: dlt's load step done, the save's bookkeeping (owner's hints, load records) not yet.

After the restart the save is either wholly there - its rows AND its ``_dlt_loads`` record - or not there at
all; the owner's rows are untouched; and the client's retry with the same ``save_id`` (what ``Dataset.save``
sends on its own) stores the rows exactly once. The client, whose connection was lost after the upload, is told
that the save may have been stored and which id to retry with (review 22, F3); a retry with that id but other
rows is refused (the journal keeps the request's fingerprint across the crash, F6).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dlt
import pyarrow as pa
import pytest

from client import connect
from client.errors import FlightShareError, InvalidRequestError, ServerUnavailableError
from flight_server.domain import faults
from flight_server.testing.servers import ServerProcess, environment
from tests.test_owner_data import DATASET, Owner, make_owner

pytestmark = pytest.mark.slow

KINDS = ["duckdb", "sqlite", "delta_local", "delta_s3", "postgres"]
POINTS = ["load", "loads-record", "loaded"]
ROWS = 5_000
OWNER_ROWS = [{"id": i, "v": f"owner {i}"} for i in range(3)]


@pytest.fixture(scope="module", params=KINDS)
def owner(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Owner]:
    owner = make_owner(request.param, request, tmp_path_factory.mktemp(f"crash_{request.param}"))
    for point in POINTS:  # one table of the owner's per kill point (dlt's dict rows: with _dlt_load_id)
        owner.run("crash_owner", OWNER_ROWS, owner.root / "owner_pipelines", name=_table(point))
    yield owner


def _table(point: str) -> str:
    return "t_" + point.replace("-", "_")


def _state(owner: Owner, table: str) -> dict[str, Any]:
    """What the destination holds, read by the owner's own tools: the table's rows by load id, and the
    load ids ``_dlt_loads`` records."""
    rows = owner.read(table, "crash_owner")
    by_load: dict[str, int] = {}
    for row in rows:
        by_load[row["_dlt_load_id"]] = by_load.get(row["_dlt_load_id"], 0) + 1
    with environment(owner.env):
        if owner.delta_options is not None:
            import fsspec

            options = owner.delta_options
            base = options["_base"]
            fs = fsspec.filesystem("s3", key=options["AWS_ACCESS_KEY_ID"], secret=options["AWS_SECRET_ACCESS_KEY"],
                                   client_kwargs={"endpoint_url": options["AWS_ENDPOINT_URL"],
                                                  "region_name": options["AWS_REGION"]},
                                   skip_instance_cache=True, use_listings_cache=False) \
                if base.startswith("s3://") else fsspec.filesystem("file")
            recorded = {json.loads(fs.cat_file(f))["load_id"] for f in fs.glob(f"{base}/{DATASET}/_dlt_loads/*.jsonl")}
        else:
            recorded = {r[0] for r in dlt.dataset(owner.destination(), DATASET)("SELECT load_id FROM _dlt_loads").fetchall()}
    return {"rows": rows, "by_load": by_load, "recorded": recorded}


def _owner_rows(state: dict[str, Any]) -> list[tuple[int, str]]:
    return sorted((r["id"], r["v"]) for r in state["rows"] if r["v"].startswith("owner"))


def _told_it_may_be_stored(error: ServerUnavailableError, save_id: str) -> None:
    """Regression (review 22, F3): a client whose server died in the save's load step was told "the server
    closed the connection while the save was uploading, so nothing was saved" (the save was finished at the
    restart), or - after its own resend of a table hit the dead server - gRPC's "failed to connect to all
    addresses ... gRPC client debug context ...". It is told the save may be stored, and the id to retry with."""
    text = str(error)
    assert error.fields["may_be_stored"] is True and error.fields["save_id"] == save_id, error.fields
    assert "the save may have been stored" in text and f"retry only with save_id={save_id!r}" in text, text
    assert "nothing was saved" not in text and "gRPC" not in text and "failed to connect" not in text, text


@pytest.mark.parametrize("point", POINTS)
def test_a_save_killed_at_any_point_is_whole_or_absent_after_restart_and_its_retry_stores_it_once(
        owner: Owner, point: str, tmp_path: Path) -> None:
    table = _table(point)
    upload = pa.table({"id": list(range(100, 100 + ROWS)), "v": [f"saved {i}" for i in range(ROWS)]})
    # a table is sent again by the client on its own (to the dead server); a reader is read once, not resent
    data = upload if point != "loaded" else pa.RecordBatchReader.from_batches(upload.schema, upload.to_batches(1000))
    before = _state(owner, table)
    with ServerProcess(owner.project, env={**owner.env, faults.VARIABLE: f"{point}:kill"}) as server:
        with pytest.raises(ServerUnavailableError) as lost:  # the server died under the call
            connect(server.url)[DATASET].save(data, table_name=table, save_id=f"crash-{point}")
        assert server.proc.wait(60) == -9, server.output()
    _told_it_may_be_stored(lost.value, f"crash-{point}")
    crashed = _state(owner, table)
    print(f"\n{owner.kind} {point} after the kill: save rows by load id "
          f"{ {k: n for k, n in crashed['by_load'].items() if k not in before['by_load']} }, "
          f"in _dlt_loads: {sorted(set(crashed['by_load']) - set(before['by_load']) & crashed['recorded'])}")

    with ServerProcess(owner.project, env=owner.env) as server:  # recovery at start
        recovered = _state(owner, table)
        new = {k: n for k, n in recovered["by_load"].items() if k not in before["by_load"]}
        assert _owner_rows(recovered) == _owner_rows(before)  # the owner's rows untouched
        assert new in ({}, {next(iter(new), ""): ROWS}), new  # nothing, or the whole save in one load
        assert set(new) <= recovered["recorded"], "a save's rows without their _dlt_loads record"
        print(f"{owner.kind} {point} after the restart: {new}, recorded: {sorted(set(new) & recovered['recorded'])}")

        with pytest.raises(InvalidRequestError, match=f"save_id crash-{point} was already used for a different save"):
            connect(server.url)[DATASET].save(upload.slice(0, 10), table_name=table, save_id=f"crash-{point}")
        info = connect(server.url)[DATASET].save(upload, table_name=table, save_id=f"crash-{point}")  # the retry
        assert info.rows == ROWS
        after = _state(owner, table)
        saved = sorted((r["id"], r["v"]) for r in after["rows"] if r["v"].startswith("saved"))
        assert saved == sorted(zip(upload.column("id").to_pylist(), upload.column("v").to_pylist()))  # once
        assert _owner_rows(after) == _owner_rows(before)
        assert set(after["by_load"]) <= after["recorded"] | {None}
        again = connect(server.url)[DATASET].save(upload, table_name=table, save_id=f"crash-{point}")
        assert again.load_ids == info.load_ids and _state(owner, table)["by_load"] == after["by_load"]
        assert server.alive, server.output()


@pytest.mark.parametrize("kind", ["duckdb", "delta_local"])
def test_a_save_killed_before_its_load_is_dropped_when_the_owner_changed_the_schema_meanwhile(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Resuming a package checked against an older schema would store that schema over the owner's newer one
    (the owner's column gone from the newest version): a save no job of which had started is dropped instead -
    it is not there at all - and its retry is a new save that stores the rows once."""
    owner = make_owner(kind, request, tmp_path / "owner")
    owner.run("crash_owner", OWNER_ROWS, tmp_path / "owner_pipelines", name="items")
    upload = pa.table({"id": list(range(100, 100 + ROWS)), "v": [f"saved {i}" for i in range(ROWS)]})
    with ServerProcess(owner.project, env={**owner.env, faults.VARIABLE: "load:kill"}) as server:
        with pytest.raises(FlightShareError):
            connect(server.url)[DATASET].save(upload, table_name="items", save_id="moved")
        assert server.proc.wait(60) == -9, server.output()
    owner.run("crash_owner", [{"id": 7, "v": "owner 7", "extra": "new column"}], tmp_path / "owner_pipelines",
              name="items")  # the owner's pipeline, while the server is down: a new column
    with ServerProcess(owner.project, env=owner.env) as server:
        state = _state(owner, "items")
        assert sorted(r["v"] for r in state["rows"]) == ["owner 0", "owner 1", "owner 2", "owner 7"]
        with environment(owner.env):
            assert "extra" in dlt.dataset(owner.destination(), DATASET, schema="crash_owner").schema.tables["items"]["columns"]
        assert "dropped the save" in server.output()  # not resumed: no job of it had started
        info = connect(server.url)[DATASET].save(upload, table_name="items", save_id="moved")
        assert info.rows == ROWS
        assert sum(1 for r in _state(owner, "items")["rows"] if r["v"].startswith("saved")) == ROWS
        with environment(owner.env):
            assert "extra" in dlt.dataset(owner.destination(), DATASET, schema="crash_owner").schema.tables["items"]["columns"]
