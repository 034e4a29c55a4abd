"""A dataset in a duckdb file: the embedded default destination.

duckdb locks its file per process, so the server holds one connection per file and everything —
reads, SQL and dlt writes (dlt borrows the same connection) — goes through it. Reads use a cursor
per request and duckdb's own Arrow C++ stream (``fetch_record_batch``), handed to Flight unchanged.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import duckdb
import dlt
import pyarrow as pa

from flight_server.config import DatasetConfig, DestinationConfig
from flight_server.storage.base import Storage, StoredSchema

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

    def capabilities(self) -> Any:
        return dlt.destinations.duckdb().capabilities()

    def dlt_destination(self) -> Any:
        # dlt borrows our connection: a second connection to the file would hit duckdb's lock
        return dlt.destinations.duckdb(self._con, destination_name=self.destination_config.name)

    @property
    def location(self) -> str:
        return f"duckdb:///{self.path.lstrip('/')}" if self.path.startswith("/") else f"duckdb:///{self.path}"

    def _select(self, table: str, columns: Sequence[str] | None, limit: int | None) -> str:
        cols = ", ".join(quote(c) for c in columns) if columns else ", ".join(quote(c) for c in self.table_columns(table))
        sql = f"SELECT {cols} FROM {quote(self.dataset.name)}.{quote(table)}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return sql

    def row_count(self, table: str) -> int:
        self.table_columns(table)  # NotFound for unknown tables
        row = self.cursor().execute(f"SELECT count(*) FROM {quote(self.dataset.name)}.{quote(table)}").fetchone()
        return int(row[0]) if row else -1

    def reader(self, table: str, columns: Sequence[str] | None, limit: int | None) -> pa.RecordBatchReader:
        schema = self.arrow_schema(table, columns)
        cursor = self.cursor()
        # dlt advertises timestamptz as tz=UTC; with the session in UTC duckdb streams exactly that
        # (otherwise it names the host's zone and every batch would need a cast)
        cursor.execute("SET TimeZone = 'UTC'")
        reader = cursor.sql(self._select(table, schema.names, limit)).to_arrow_reader(self.batch_rows)
        return reader if reader.schema.equals(schema) else reader.cast(schema)

    def query(self, sql: str) -> pa.RecordBatchReader:
        return self.cursor().sql(sql).to_arrow_reader(self.batch_rows)
