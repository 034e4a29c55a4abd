"""A dataset in a duckdb file: the embedded default destination.

duckdb locks its file per process, so the server holds one connection per file and everything —
reads, SQL and dlt writes (dlt borrows the same connection) — goes through it. Reads use a cursor
per request and duckdb's own Arrow C++ stream (``to_arrow_reader``), handed to Flight unchanged.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import duckdb
import dlt
import pyarrow as pa

from flight_server.config import DatasetConfig, DestinationConfig
from flight_server.storage.base import SQL_REPLACE_STRATEGY, Partition, Storage, StoredSchema, int_range, split_evenly

_connections: dict[str, duckdb.DuckDBPyConnection] = {}
_connections_lock = threading.Lock()


def quote(name: str) -> str:
    """A duckdb/postgres quoted identifier."""
    return '"' + name.replace('"', '""') + '"'


def shared_connection(path: str) -> duckdb.DuckDBPyConnection:
    """The process-wide connection to one duckdb file (created on first use)."""
    with _connections_lock:
        con = _connections.get(path)
        if con is None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            con = duckdb.connect(path)
            _connections[path] = con
        return con


class DuckDBStorage(Storage):
    """One dataset (a duckdb schema) inside one duckdb file."""

    def __init__(self, dataset: DatasetConfig, destination: DestinationConfig, batch_rows: int = 122_880) -> None:
        super().__init__(dataset, destination)
        assert destination.location is not None
        self.path = destination.location
        self.batch_rows = batch_rows
        self._con = shared_connection(self.path)

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection for one request (duckdb cursors are per-thread connections to one database)."""
        return self._con.cursor()

    def _load_stored_schema(self) -> StoredSchema | None:
        cur = self.cursor()
        exists = cur.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = '_dlt_version'",
            [self.dataset.name],
        ).fetchone()
        if not exists or not exists[0]:
            return None
        row = cur.execute(
            f"SELECT version, version_hash, schema FROM {quote(self.dataset.name)}._dlt_version "
            "ORDER BY inserted_at DESC LIMIT 1"
        ).fetchone()
        return StoredSchema.from_row(*row) if row else None

    def forget_schema_version(self, schema_name: str, version_hash: str) -> None:
        self.cursor().execute(
            f"DELETE FROM {quote(self.dataset.name)}._dlt_version WHERE schema_name = ? AND version_hash = ?",
            [schema_name, version_hash],
        )

    def capabilities(self) -> Any:
        return dlt.destinations.duckdb().capabilities()

    def dlt_destination(self) -> Any:
        # dlt borrows our connection: a second connection to the file would hit duckdb's lock
        return dlt.destinations.duckdb(self._con, destination_name=self.destination_config.name,
                                       replace_strategy=SQL_REPLACE_STRATEGY)  # all-or-nothing replace

    @property
    def location(self) -> str:
        return f"duckdb:///{self.path.lstrip('/')}" if self.path.startswith("/") else f"duckdb:///{self.path}"

    def _select(self, table: str, columns: Sequence[str] | None, limit: int | None, where: str | None = None) -> str:
        cols = ", ".join(quote(c) for c in columns) if columns else ", ".join(quote(c) for c in self.table_columns(table))
        sql = f"SELECT {cols} FROM {quote(self.dataset.name)}.{quote(table)}"
        if where:
            sql += f" WHERE {where}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return sql

    def data_version(self) -> Any:
        """The stored schema's hash and the newest dlt load id: every write to the file is a dlt load
        (duckdb's lock keeps other processes out while this server runs)."""
        stored = self.stored_schema()
        if stored is None:
            return None
        try:
            row = self.cursor().execute(f"SELECT max(load_id) FROM {quote(self.dataset.name)}._dlt_loads").fetchone()
        except duckdb.Error:
            return None
        return (stored.version_hash, row[0] if row else None)

    def row_count(self, table: str) -> int:
        self.table_columns(table)  # NotFound for unknown tables
        row = self.cursor().execute(f"SELECT count(*) FROM {quote(self.dataset.name)}.{quote(table)}").fetchone()
        return int(row[0]) if row else -1

    def partitions(self, table: str, target_rows: int) -> list[Partition]:
        """Row-id ranges: duckdb pushes ``rowid`` bounds into its scan (only the row groups in range
        are read) and returns rows in insertion order. Ranges span ``0..max(rowid)`` so rows left
        after deletes are covered; the last range is open-ended."""
        self.table_columns(table)  # NotFound for unknown tables
        rows, top = self.cursor().execute(
            f"SELECT count(*), max(rowid) FROM {quote(self.dataset.name)}.{quote(table)}").fetchone()
        n = split_evenly(int(rows), target_rows)
        if n == 1:
            return [Partition({}, int(rows))]
        extent = int(top) + 1
        edges = [extent * i // n for i in range(n)] + [None]
        parts = [Partition({"rowid": [edges[i], edges[i + 1]]}, int(rows) // n) for i in range(n)]
        parts[-1] = Partition(parts[-1].spec, int(rows) - sum(p.records for p in parts[:-1]))
        return parts

    def reader(self, table: str, columns: Sequence[str] | None, limit: int | None,
               partition: dict[str, Any] | None = None) -> pa.RecordBatchReader:
        schema = self.arrow_schema(table, columns)
        where = None
        if partition:
            start, stop = int_range(partition, "rowid")
            where = f"rowid >= {start}" + (f" AND rowid < {stop}" if stop is not None else "")
        cursor = self.cursor()
        # dlt advertises timestamptz as tz=UTC; with the session in UTC duckdb streams exactly that
        # (otherwise it names the host's zone and every batch would need a cast)
        cursor.execute("SET TimeZone = 'UTC'")
        reader = cursor.sql(self._select(table, schema.names, limit, where)).to_arrow_reader(self.batch_rows)
        return reader if reader.schema.equals(schema) else reader.cast(schema)

    def query(self, sql: str) -> pa.RecordBatchReader:
        return self.cursor().sql(sql).to_arrow_reader(self.batch_rows)
