"""Parallel reads: one table read as several independently readable endpoints, on any replica.

GetFlightInfo for a table asks the dataset's adapter for :meth:`Storage.partitions` — contiguous
slices of about ``server.endpoint_rows`` rows, in table order:

* Delta Lake: groups of the data files of one table *version* (files larger than the target are
  split by Parquet row groups). The version is in the ticket, so all endpoints read one snapshot.
* PostgreSQL: page ranges of the table's heap, read as ``ctid`` range scans (PostgreSQL 14+).
* duckdb: ``rowid`` ranges, pushed into duckdb's scan.

Each slice becomes a :class:`ReadCommand` with a ``partition`` — the ticket of one endpoint. A ticket
names everything needed to read its slice, and nothing about the server that planned it, so any
replica over the same destination serves it: that is what makes the servers stateless.

What is not split: a read with a ``limit`` (one stream; "the first n rows" has no parallel meaning),
SQL queries, and tables at or under the target size. Projection travels in every ticket.

``total_records`` is exact (Delta log statistics, ``count(*)``); per-endpoint counts are exact on
Delta and estimated from sizes on PostgreSQL/duckdb. ``total_bytes`` estimates the Arrow bytes the
read streams: the size of a small sample of the projected rows, scaled to ``total_records``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

from client.protocol import EndpointMetadata, ReadCommand
from flight_server.domain.errors import InvalidRequest
from flight_server.domain.storage import Storage

SAMPLE_ROWS = 2048  # rows read to estimate the Arrow size of a result


@dataclass(frozen=True)
class ReadPlan:
    """The endpoints of one table read, in table order."""

    commands: list[ReadCommand]  # one per endpoint; its ticket
    records: list[int]  # rows per endpoint (-1: unknown)
    total_records: int
    total_bytes: int

    def metadata(self, index: int) -> bytes:
        """An endpoint's ``app_metadata``: its position and row count."""
        return EndpointMetadata(index, self.records[index]).to_bytes()


def plan_read(storage: Storage, command: ReadCommand, target_rows: int) -> ReadPlan:
    """Split a table read into endpoints of about ``target_rows`` rows."""
    if command.partition is not None:
        # Partitions are the server's to plan (issue 22): a client may ask for data, never for files or
        # table versions - a signed partition named any file or version it liked (a Delta version of 2**63
        # walked the log backwards forever; an old version read rows the owner's replace had removed).
        raise InvalidRequest(
            f"a read of '{command.dataset}.{command.table}' may not name a partition: the server plans the "
            "partitions of a table and signs each in its endpoint's ticket; ask for the table (columns, limit) "
            "and read the endpoints GetFlightInfo returns", dataset=command.dataset, table=command.table)
    if command.limit is not None:
        total = min(storage.row_count(command.table), command.limit)
        return ReadPlan([command], [total], total, estimate_bytes(storage, command, total))
    parts = storage.partitions(command.table, target_rows)
    total = sum(p.records for p in parts)
    if len(parts) <= 1:
        commands, records = [command], [total]
    else:
        commands = [replace(command, partition=p.spec) for p in parts]
        records = [p.records for p in parts]
    return ReadPlan(commands, records, total, estimate_bytes(storage, command, total))


def estimate_bytes(storage: Storage, command: ReadCommand, total_records: int) -> int:
    """Arrow bytes of ``total_records`` rows of the projection, from the first rows' size."""
    if total_records <= 0:
        return 0
    per_row = storage.row_bytes(command.table, command.columns, min(SAMPLE_ROWS, total_records))
    return -1 if per_row is None else int(per_row * total_records)


class LocationRing:
    """Replica locations handed to endpoints round-robin (``server.locations``).

    Each plan starts one further along the ring, so single-endpoint reads spread over the replicas
    too. Without locations an endpoint names none: "read it from the server you asked".
    """

    def __init__(self, locations: Sequence[str]) -> None:
        self.locations = list(locations)
        self._next = itertools.count()
        self._lock = threading.Lock()

    def assign(self, endpoints: int) -> list[list[str]]:
        if not self.locations:
            return [[] for _ in range(endpoints)]
        with self._lock:
            start = next(self._next)
        n = len(self.locations)
        return [[self.locations[(start + i) % n]] for i in range(endpoints)]
