"""Replicas: two ``flight-share serve`` processes on loopback over one Delta table on S3 (a real
moto_server). Both read the same project file, whose ``server.locations`` lists both; a client that
asked either one reads the endpoints from both, round-robin, and each server's ``health`` counters
show its share. A write through one replica is visible through the other without a restart, and a
replica that goes away does not break a read (its endpoints are read from the server asked).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from client import connect, protocol
from client.protocol import ReadCommand
from flight_server.testing.servers import ServerProcess, wait_until
from flight_server.testing.services import free_port

ROWS = 40_000

PROJECT = """
project: {{name: replicated}}
destinations:
  lake:
    type: filesystem
    bucket_url: s3://{{env.S3_BUCKET}}/{prefix}
    table_format: delta
    credentials:
      aws_access_key_id: "{{env.AWS_ACCESS_KEY_ID}}"
      aws_secret_access_key: "{{env.AWS_SECRET_ACCESS_KEY}}"
      endpoint_url: "{{env.S3_ENDPOINT_URL}}"
      region_name: "{{env.S3_REGION}}"
datasets:
  shared_dataset: {{destination: [lake]}}
profiles:
  access:
    datasets:
      shared_dataset: {{}}
server:
  profile: access
  # replicas share the signing secret: a ticket one of them signed is honoured by the other
  jwt_secret: "{{env.REPLICA_JWT_SECRET}}"
  endpoint_rows: 8000
  locations: ["grpc://127.0.0.1:{port_a}", "grpc://127.0.0.1:{port_b}"]
"""


class Replicas:
    def __init__(self, project: Path, env: dict[str, str], ports: tuple[int, int]) -> None:
        self.project, self.env, self.ports = project, env, ports
        self.a = ServerProcess(project, env=env, port=ports[0])
        try:
            self.b = ServerProcess(project, env=env, port=ports[1])
        except BaseException:
            self.a.stop()
            raise

    def do_gets(self, server: ServerProcess) -> int:
        health = json.loads(next(flight.connect(server.url).do_action(flight.Action(protocol.ACTION_HEALTH, b""))).body.to_pybytes())
        return int(health["calls"].get("do_get", 0))

    def stop(self) -> None:
        self.a.stop()
        self.b.stop()


@pytest.fixture(scope="module")
def replicas(s3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    ports = (free_port(), free_port())
    while ports[1] == ports[0]:
        ports = (ports[0], free_port())
    project = tmp_path_factory.mktemp("replicas") / "dlt.yml"
    project.write_text(PROJECT.format(prefix=f"replicas_{uuid.uuid4().hex[:8]}", port_a=ports[0], port_b=ports[1]))
    env = dict(s3.env)
    env["REPLICA_JWT_SECRET"] = "replica-test-secret-" + "x" * 32
    started = Replicas(project, env, ports)
    try:
        ds = connect(started.a.url).shared_dataset
        for start in range(0, ROWS, 10_000):  # four loads: four Delta files
            ds.save(pa.table({"i": pa.array(range(start, start + 10_000), pa.int64()),
                              "s": [f"v{k}" for k in range(start, start + 10_000)]}), table_name="events")
        yield started
        assert started.a.alive and started.b.alive
    finally:
        started.stop()


def test_endpoints_name_both_replicas_and_a_client_reads_from_both(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    before = {a.url: replicas.do_gets(a), b.url: replicas.do_gets(b)}
    catalog = connect(a.url)
    info = catalog._connection.flight_info(ReadCommand("shared_dataset", "events"))
    assert len(info.endpoints) == 4 and info.total_records == ROWS
    named = [e.locations[0].uri.decode() for e in info.endpoints]
    assert set(named) == {a.url, b.url}
    assert all(x != y for x, y in zip(named, named[1:]))  # round-robin
    data = catalog.shared_dataset.events.arrow()
    assert sorted(data.column("i").to_pylist()) == list(range(ROWS))
    served = {a.url: replicas.do_gets(a) - before[a.url], b.url: replicas.do_gets(b) - before[b.url]}
    assert served[a.url] >= 1 and served[b.url] >= 1 and sum(served.values()) == len(info.endpoints)


def test_a_plain_flight_client_follows_the_locations(replicas: Replicas) -> None:
    info = flight.connect(replicas.b.url).get_flight_info(flight.FlightDescriptor.for_path("shared_dataset", "events"))
    parts = []
    for endpoint in info.endpoints:
        location = endpoint.locations[0]
        parts.append(flight.connect(location).do_get(endpoint.ticket).read_all())
    assert sorted(pa.concat_tables(parts).column("i").to_pylist()) == list(range(ROWS))
    # planning rotates the ring: the next flight starts on the other replica
    again = flight.connect(replicas.b.url).get_flight_info(flight.FlightDescriptor.for_path("shared_dataset", "events"))
    assert again.endpoints[0].locations[0] != info.endpoints[0].locations[0]


def test_a_write_through_one_replica_is_read_through_the_other(replicas: Replicas) -> None:
    connect(replicas.a.url).shared_dataset.save(pa.table({"k": [1, 2, 3]}), table_name="written_on_a")

    def listed_by_b() -> bool:
        with connect(replicas.b.url) as catalog:
            return "written_on_a" in catalog.shared_dataset.tables

    # the other replica re-reads the stored schema every few seconds (SHARED_SCHEMA_TTL): polled, not slept
    wait_until(listed_by_b, "the table written on a listed by b", timeout=60, every=0.2)
    assert connect(replicas.b.url).shared_dataset.written_on_a.arrow().column("k").to_pylist() == [1, 2, 3]


def test_a_replica_that_went_away_does_not_break_a_read(replicas: Replicas) -> None:
    replicas.b.stop()
    try:
        before = replicas.do_gets(replicas.a)
        catalog = connect(replicas.a.url)
        data = catalog.shared_dataset.events.arrow()
        assert sorted(data.column("i").to_pylist()) == list(range(ROWS))
        batches = list(catalog.shared_dataset.events.iter_batches())
        assert pa.Table.from_batches(batches).equals(data)
        # both reads were served by the replica still there: each endpoint from it, or (the client's fallback
        # when an endpoint's location does not answer) the rest of the read in fewer calls; its counter moves
        # when each call has ended there
        served = wait_until(lambda: replicas.do_gets(replicas.a) - before >= 2 and replicas.do_gets(replicas.a),
                            "replica a served both reads")
        assert served - before <= 8  # never more than every endpoint of both reads
    finally:
        replicas.b = ServerProcess(replicas.project, env=replicas.env, port=replicas.ports[1])
