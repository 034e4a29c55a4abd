"""Parallel endpoints on every destination: a large table read is split (Delta file groups and row
groups, PostgreSQL page ranges, duckdb row-id ranges), every endpoint is readable on its own, the
client reads them concurrently and reassembles them in order, projection and limits stay exact.

Each destination gets its own project and server with ``server.endpoint_rows: 10000``; its table is
loaded through the server (three saves: 25,000 + 6,000 + 6,000 rows).
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from client import InvalidRequestError, connect, protocol
from client._transport import Connection
from client.protocol import ReadCommand
from flight_server.domain.config import ConfigError, load_project
from flight_server.domain.storage import contiguous_groups
from flight_server.storage import open_storage
from flight_server.testing.servers import ServerProcess, environment, wait_until

KINDS = ["duckdb", "delta_local", "delta_s3", "postgres"]
TARGET = 10_000
SIZES = (25_000, 6_000, 6_000)
ROWS = sum(SIZES)

STORES = {
    "duckdb": "  store: {type: duckdb, location: _data/store.duckdb}\n",
    "delta_local": "  store: {type: filesystem, bucket_url: _data/lake, table_format: delta}\n",
    "delta_s3": (
        "  store:\n    type: filesystem\n    bucket_url: s3://{env.S3_BUCKET}/{env.LAKE_PREFIX}\n    table_format: delta\n"
        "    credentials:\n      aws_access_key_id: \"{env.AWS_ACCESS_KEY_ID}\"\n"
        "      aws_secret_access_key: \"{env.AWS_SECRET_ACCESS_KEY}\"\n"
        "      endpoint_url: \"{env.S3_ENDPOINT_URL}\"\n      region_name: \"{env.S3_REGION}\"\n"
    ),
    "postgres": (
        "  store:\n    type: postgres\n    credentials:\n      host: \"{env.PG_HOST}\"\n      port: \"{env.PG_PORT}\"\n"
        "      username: \"{env.PG_USER}\"\n      password: \"{env.PG_PASSWORD}\"\n      database: \"{env.PG_DATABASE}\"\n"
    ),
}
DATASETS = f"""
datasets:
  big_dataset: {{destination: [store]}}
profiles:
  access:
    datasets:
      big_dataset: {{}}
server: {{profile: access, endpoint_rows: {TARGET}, cache_bytes: 0}}  # these tests are about endpoints, not the memory cache
"""


def ticket_command(ticket: bytes) -> dict:
    """The command inside a signed ticket (``fst1.<payload>.<mac>``: the payload is readable, not secret)."""
    payload = ticket[len(b"fst1."):].split(b".")[0]
    body = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    return json.loads(body["c"])


def numbers(start: int, count: int) -> pa.Table:
    return pa.table({"i": pa.array(range(start, start + count), pa.int64()),
                     "s": pa.array([f"row-{k}" for k in range(start, start + count)]),
                     "f": pa.array([k / 7 for k in range(start, start + count)])})


@dataclass
class Split:
    kind: str
    project: Path
    server: ServerProcess
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def info(self, command: ReadCommand) -> flight.FlightInfo:
        return flight.connect(self.url).get_flight_info(flight.FlightDescriptor.for_command(protocol.encode_command(command)))

    @contextlib.contextmanager
    def storage(self) -> Iterator[Any]:
        with environment(self.env):
            project = load_project(self.project)
            storage = open_storage(project, project.datasets["big_dataset"])
            try:
                yield storage
            finally:
                storage.close()


def prepare(kind: str, request: pytest.FixtureRequest, folder: Path) -> tuple[Path, dict[str, str]]:
    env: dict[str, str] = {}
    if kind == "delta_s3":
        env = {**request.getfixturevalue("s3").env, "LAKE_PREFIX": f"split_{uuid.uuid4().hex[:8]}"}
    elif kind == "postgres":
        pg = request.getfixturevalue("postgres")
        database = f"split_{uuid.uuid4().hex[:8]}"
        pg._admin(f"CREATE DATABASE {database} OWNER {pg.user}")
        env = {**pg.env, "PG_DATABASE": database}
    project = folder / "dlt.yml"
    project.write_text("project: {name: split}\ndestinations:\n" + STORES[kind] + DATASETS)
    return project, env


@pytest.fixture(scope="module")
def _started(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One loaded project and server per destination kind, started on first use, stopped at module end."""
    with contextlib.ExitStack() as stack:
        started: dict[str, Any] = {"_stack": stack, "_request": request, "_tmp": tmp_path_factory}
        yield started
        for kind, value in started.items():
            if not kind.startswith("_"):
                assert value.server.alive, f"the {kind} server died during the tests:\n{value.server.output()}"


def _split(started: dict[str, Any], kind: str) -> Split:
    if kind not in started:
        project, env = prepare(kind, started["_request"], started["_tmp"].mktemp(f"split-{kind}"))
        server = started["_stack"].enter_context(ServerProcess(project, env=env))
        ds = connect(server.url).big_dataset
        start = 0
        for size in SIZES:  # one load (one Delta file) per save
            ds.save(numbers(start, size).to_batches(max_chunksize=5_000), table_name="numbers")
            start += size
        started[kind] = Split(kind, project, server, env)
    return started[kind]


@pytest.fixture(params=KINDS)
def split(request: pytest.FixtureRequest, _started: dict[str, Any]) -> Split:
    return _split(_started, request.param)


@pytest.fixture(params=["delta_local", "delta_s3"])
def delta_split(request: pytest.FixtureRequest, _started: dict[str, Any]) -> Split:
    return _split(_started, request.param)


def single_stream(split: Split, columns: tuple[str, ...] | None = None) -> pa.Table:
    """The table as one stream (a limit is never split)."""
    info = split.info(ReadCommand("big_dataset", "numbers", columns, limit=ROWS))
    assert len(info.endpoints) == 1
    return flight.connect(split.url).do_get(info.endpoints[0].ticket).read_all()


def test_a_large_table_is_split_into_independently_readable_endpoints(split: Split) -> None:
    info = split.info(ReadCommand("big_dataset", "numbers"))
    assert len(info.endpoints) >= 2
    assert info.total_records == ROWS and info.ordered  # endpoints are in table order
    parts = []
    for index, endpoint in enumerate(info.endpoints):
        ticket = ticket_command(endpoint.ticket.ticket)
        assert ticket["partition"] and ticket["table"] == "numbers"
        assert endpoint.locations == []  # no server.locations: read it from the server that answered
        meta = json.loads(endpoint.app_metadata)
        assert meta["partition"] == index
        data = flight.connect(split.url).do_get(endpoint.ticket).read_all()  # each one on a fresh client
        assert data.schema.equals(info.schema)
        if split.kind.startswith("delta"):
            assert meta["records"] == data.num_rows  # exact: from the Delta log
        parts.append((meta["records"], data))
    assert sum(records for records, _ in parts) == ROWS
    whole = pa.concat_tables([data for _, data in parts])
    ids = whole.column("i").to_pylist()
    assert len(ids) == len(set(ids)) == ROWS and set(ids) == set(range(ROWS))
    # endpoint order is table order: the same rows in the same order as one stream
    assert whole.equals(single_stream(split).select(whole.column_names))
    assert 0.5 <= info.total_bytes / whole.nbytes <= 2.0


def test_the_client_reads_endpoints_concurrently_and_in_order(split: Split, monkeypatch: pytest.MonkeyPatch) -> None:
    table = connect(split.url).big_dataset.numbers
    expected = single_stream(split)
    # two endpoints must be in flight at once, or the barrier breaks
    barrier = threading.Barrier(2, timeout=30)
    threads: set[str] = set()
    read_endpoint, endpoint_batches = Connection._read_endpoint, Connection._endpoint_batches

    def concurrent_read(self: Connection, endpoint: flight.FlightEndpoint) -> pa.Table:
        threads.add(threading.current_thread().name)
        if json.loads(endpoint.app_metadata)["partition"] < 2:
            barrier.wait()
        return read_endpoint(self, endpoint)

    def concurrent_batches(self: Connection, endpoint: flight.FlightEndpoint) -> Iterator[pa.RecordBatch]:
        threads.add(threading.current_thread().name)
        if json.loads(endpoint.app_metadata)["partition"] < 2:
            barrier.wait()
        yield from endpoint_batches(self, endpoint)

    monkeypatch.setattr(Connection, "_read_endpoint", concurrent_read)
    monkeypatch.setattr(Connection, "_endpoint_batches", concurrent_batches)
    data = table.arrow()
    assert data.equals(expected)
    assert len(threads) >= 2
    barrier.reset()
    batches = list(table.iter_batches())
    assert pa.Table.from_batches(batches).equals(expected)
    assert max(b.num_rows for b in batches) <= 122_880
    # a consumer that stops early ends every running DoGet and returns at once
    stream = table.iter_batches()
    barrier.reset()
    assert next(stream).num_rows > 0
    stream.close()
    assert table.df()["i"].tolist() == expected.column("i").to_pylist()
    monkeypatch.undo()
    # fewer workers than endpoints, and none: the same rows in the same order
    for parallel in (2, 1):
        narrow = connect(split.url).big_dataset.numbers
        narrow._connection.parallel_endpoints = parallel
        assert narrow.arrow().equals(expected)
        assert pa.Table.from_batches(list(narrow.iter_batches())).equals(expected)


def test_projection_travels_in_every_ticket_and_a_limit_is_one_endpoint(split: Split) -> None:
    info = split.info(ReadCommand("big_dataset", "numbers", ("f", "i")))
    assert len(info.endpoints) >= 2 and info.schema.names == ["f", "i"]
    for endpoint in info.endpoints:
        assert ticket_command(endpoint.ticket.ticket)["columns"] == ["f", "i"]
    table = connect(split.url).big_dataset.numbers
    projected = table.select("f", "i").arrow()
    assert projected.column_names == ["f", "i"]
    assert projected.equals(single_stream(split, ("f", "i")))
    limited = split.info(ReadCommand("big_dataset", "numbers", ("i",), limit=12_345))
    assert len(limited.endpoints) == 1 and limited.total_records == 12_345
    assert "partition" not in ticket_command(limited.endpoints[0].ticket.ticket)
    assert table.select("i").limit(12_345).arrow().num_rows == 12_345
    assert table.limit(0).arrow().num_rows == 0
    assert table.row_count() == ROWS


def test_malformed_or_foreign_partitions_are_refused(split: Split) -> None:
    client = flight.connect(split.url)
    # a hand-made ticket is refused before its partition is even looked at: tickets are signed
    ticket = flight.Ticket(protocol.encode_command(ReadCommand("big_dataset", "numbers", partition={"rowid": [0, 1]})))
    with pytest.raises(pa.ArrowInvalid, match="not a valid flight-share ticket"):
        client.do_get(ticket).read_all()
    # a partition in a command descriptor is refused whatever it names: partitions are the server's to plan
    # (issue 22: a signed Delta version of 2**63 walked the log forever; an old one read rows a replace removed)
    forged: list[dict] = [{"nonsense": 1}, {"rowid": ["a", 1]}, {"pages": [5, 1]}, {"version": -1, "files": []},
                          {"rowid": "x"}, {"version": 2**63 - 1, "files": [["x.parquet"]]}]
    info = split.info(ReadCommand("big_dataset", "numbers"))
    forged += [ticket_command(e.ticket.ticket)["partition"] for e in info.endpoints[:1]
               if "partition" in ticket_command(e.ticket.ticket)]  # even one the server once signed
    if split.kind.startswith("delta"):
        version = ticket_command(info.endpoints[0].ticket.ticket)["partition"]["version"]
        forged.append({"version": version, "files": [["../../elsewhere/secret.parquet"]]})
    for partition in forged:
        with pytest.raises(InvalidRequestError, match="may not name a partition"):
            list(Connection(split.url).batches(ReadCommand("big_dataset", "numbers", partition=partition)))


def test_delta_endpoints_read_the_version_they_were_planned_on(delta_split: Split) -> None:
    """(PostgreSQL and duckdb endpoints read the table as it is when each one runs.)"""
    split = delta_split
    ds = connect(split.url).big_dataset
    ds.save(numbers(0, 15_000), table_name="versioned")
    ds.save(numbers(15_000, 15_000), table_name="versioned")
    old = split.info(ReadCommand("big_dataset", "versioned"))
    assert len(old.endpoints) >= 2
    ds.save(numbers(1_000_000, 100), table_name="versioned", write_disposition="replace")
    client = flight.connect(split.url)
    then = pa.concat_tables([client.do_get(e.ticket).read_all() for e in old.endpoints])
    assert sorted(then.column("i").to_pylist()) == list(range(30_000))  # the snapshot the plan named
    now = split.info(ReadCommand("big_dataset", "versioned"))
    assert now.total_records == 100 and len(now.endpoints) == 1
    assert sorted(ds.versioned.arrow().column("i").to_pylist()) == list(range(1_000_000, 1_000_100))


def test_delta_files_larger_than_the_target_are_split_by_row_groups(delta_split: Split) -> None:
    """A file written by another engine (deltalake, row groups of 4,000 rows) next to dlt's file."""
    from deltalake import WriterProperties, write_deltalake

    split = delta_split
    ds = connect(split.url).big_dataset
    ds.save(numbers(0, 3_000), table_name="grouped")
    with split.storage() as storage:
        dlt_file = storage.reader("grouped", None, None).read_all()
        extra = numbers(3_000, 40_000).append_column("_dlt_load_id", pa.array(["other-engine"] * 40_000)) \
            .append_column("_dlt_id", pa.array([f"id{k}" for k in range(40_000)]))
        write_deltalake(storage.table_uri("grouped"), extra.select(dlt_file.column_names), mode="append",
                        storage_options=storage._storage_options or None,
                        writer_properties=WriterProperties(max_row_group_size=4_000))
    info = split.info(ReadCommand("big_dataset", "grouped", ("i",)))
    assert info.total_records == 43_000 and len(info.endpoints) >= 4
    files = [f for e in info.endpoints for f in ticket_command(e.ticket.ticket)["partition"]["files"]]
    ranges = [f for f in files if len(f) == 3]
    assert ranges and all(f[1] < f[2] for f in ranges)  # [path, first row group, stop]
    client = flight.connect(split.url)
    parts = [client.do_get(e.ticket).read_all() for e in info.endpoints]
    assert [json.loads(e.app_metadata)["records"] for e in info.endpoints] == [p.num_rows for p in parts]
    assert max(p.num_rows for p in parts) <= 2 * TARGET
    ids = pa.concat_tables(parts).column("i").to_pylist()
    assert sorted(ids) == list(range(43_000))
    assert ids == single_stream_of(split, "grouped")


def single_stream_of(split: Split, table: str) -> list[int]:
    info = split.info(ReadCommand("big_dataset", table, ("i",), limit=10**6))
    return flight.connect(split.url).do_get(info.endpoints[0].ticket).read_all().column("i").to_pylist()


def test_contiguous_groups_cut_at_the_nearest_unit_boundary() -> None:
    assert contiguous_groups([6_000, 6_000, 25_000], 3) == [(0, 2), (2, 3)]
    assert contiguous_groups([1] * 10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert contiguous_groups([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
    assert contiguous_groups([5], 3) == [(0, 1)]
    assert contiguous_groups([], 2) == []


@pytest.mark.parametrize(
    "server, key, text",
    [
        ("{endpoint_rows: 0}", "server.endpoint_rows", "must be a positive number"),
        ("{endpoint_rows: many}", "server.endpoint_rows", "must be a positive number"),
        ("{locations: grpc://a:1}", "server.locations", "must be a list"),
        ("{locations: [http://a:1]}", "server.locations[0]", "is not a Flight location"),
        ("{locations: ['grpc://a']}", "server.locations[0]", "is not a Flight location"),
        ("{locations: ['grpc://a:1', 'grpc://a:1']}", "server.locations[1]", "listed twice"),
    ],
)
def test_endpoint_settings_are_validated(tmp_path: Path, server: str, key: str, text: str) -> None:
    project = tmp_path / "dlt.yml"
    project.write_text("project: {name: p}\ndestinations:\n  x: {type: duckdb}\ndatasets:\n  d: {destination: x}\n"
                       f"server: {server}\n")
    with pytest.raises(ConfigError) as err:
        load_project(project)
    assert err.value.key == key and text in str(err.value)


def test_endpoint_settings_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICA_B", "grpc://10.0.0.2:8815")
    project = tmp_path / "dlt.yml"
    project.write_text("project: {name: p}\ndestinations:\n  x: {type: duckdb}\ndatasets:\n  d: {destination: x}\n"
                       "server: {endpoint_rows: 5000, locations: ['grpc://10.0.0.1:8815', '{env.REPLICA_B}', "
                       "'grpc+tls://replica.example.com:443']}\n")
    server = load_project(project).server
    assert server.endpoint_rows == 5000
    assert server.locations == ("grpc://10.0.0.1:8815", "grpc://10.0.0.2:8815", "grpc+tls://replica.example.com:443")
    defaults = load_project(project.parent / "dlt.yml").server
    assert defaults.endpoint_rows == 5000


class _ReadAhead(queue.Queue):
    """An endpoint's read-ahead buffer in the client that tells whether its fetcher has waited to put into it
    while it was full (it then waits for the consumer) and whether its fetcher has put its last item."""

    made: list[_ReadAhead] = []

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.fetcher_waited = threading.Event()
        self.ended = threading.Event()
        self.made.append(self)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if self.full():
            self.fetcher_waited.set()
        super().put(item, block, timeout)
        if not isinstance(item, pa.RecordBatch):  # the end of the endpoint, or its error
            self.ended.set()


def test_stopping_early_never_waits_on_a_full_read_ahead(split: Split, monkeypatch: pytest.MonkeyPatch) -> None:
    import client._transport

    monkeypatch.setattr(client._transport, "PREFETCH_BATCHES", 1)  # every endpoint's buffer full at once
    monkeypatch.setattr(client._transport, "queue", SimpleNamespace(Queue=_ReadAhead, Full=queue.Full))
    monkeypatch.setattr(_ReadAhead, "made", [])
    stream = connect(split.url).big_dataset.numbers.iter_batches()
    assert next(stream).num_rows > 0
    buffers = _ReadAhead.made
    assert len(buffers) >= 2

    def every_fetcher_waits() -> bool:
        """Each fetcher that runs (one per endpoint not yet at its end, at most parallel_endpoints of them)
        has filled its buffer and waits to put the next batch: nothing more happens until the consumer acts."""
        live = [b for b in buffers if not b.ended.is_set()]
        return sum(b.fetcher_waited.is_set() for b in live) >= min(Connection.parallel_endpoints, len(live))

    wait_until(every_fetcher_waits, "every fetcher waiting on its full buffer")
    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    closer.join(timeout=20)
    assert not closer.is_alive(), "closing the stream hung on a fetcher"
