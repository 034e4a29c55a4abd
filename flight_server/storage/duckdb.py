"""A dataset in a duckdb file: the embedded default destination.

duckdb locks its file per process, and the file belongs to the owner's pipelines too: the server
holds it only while a request needs it (:class:`FileHandle`) — one connection, read-only for reads,
read-write while a save's load step holds it (dlt borrows it; reads during the save share it). Reads stream duckdb's own Arrow C++
reader (``to_arrow_reader``), kept alive with the file's share until the stream is done.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dlt
import duckdb
import pyarrow as pa

from flight_server.domain.config import DatasetConfig, DestinationConfig
from flight_server.domain.errors import Cancelled, Unavailable
from flight_server.domain.identifiers import quote
from flight_server.domain.lifetime import owning_reader
from flight_server.domain.pushdown import Predicate, applicable, where_sql
from flight_server.domain.pushdown import dlt_types as _dlt_types
from flight_server.domain.storage import (
    SHARED_SCHEMA_TTL,
    SQL_SAVE_SETTINGS,
    WRITE_LOCK_TIMEOUT,
    Partition,
    Storage,
    StoredSchema,
    conform,
    int_range,
    newest_schemas_sql,
    not_null_hints,
    plain_arrow,
    select_sql,
    split_evenly,
    staging_dataset,
    with_not_null,
)

_STORAGE_VERSION = re.compile(r"version number (\d+), but we can only read versions between (\d+) and (\d+)")


def open_error(label: str, exc: duckdb.Error) -> Unavailable:
    """Why a duckdb file cannot be opened, in the user's terms: ``label`` names the file by its destination
    (errors say which destination, not where it lives: issue 22 §1)."""
    text = str(exc)
    versions = _STORAGE_VERSION.search(text)
    if versions:
        found, low, high = versions.groups()
        return Unavailable(
            f"{label} was written by a newer duckdb (storage version {found}); this server's "
            f"duckdb {duckdb.__version__} reads storage versions {low} to {high}. dlt 1.31 needs duckdb < 2, so "
            f"load it with duckdb 1.x (pip install 'duckdb<2'), or export it to a file this server reads",
            storage_version=int(found))
    if "Could not set lock" in text:
        return Unavailable(f"{label} is held by another process; retry")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return Unavailable(f"cannot open {label}: {_without(first, label)}")


def _without(text: str, label: str) -> str:
    """duckdb's message with file paths in it replaced by ``label``."""
    return re.sub(r'"[^"]*\.duckdb[^"]*"|\S*/\S*\.duckdb\S*', label, text)


# How long a request waits for the file while another process (the owner's pipeline) holds it
BUSY_TIMEOUT = 10.0
# duckdb does not queue other processes for its lock: the owner's pipeline fails fast when the server
# holds the file and retries. So overlapping reads may keep the shared connection open for at most
# HOLD_SECONDS; then new reads wait (at most DRAIN_SECONDS) until the open ones are done, the file is
# closed, and GAP_SECONDS pass in which it is free for another process. Best effort: duckdb gives no
# fairer way, and a long stream (a big table, a slow client) holds the file whatever we do - so a drain
# is tried only when every open read is younger than DRAIN_SECONDS, and given up when it takes longer.
HOLD_SECONDS = 1.0
DRAIN_SECONDS = 0.5
GAP_SECONDS = 0.3
# a file modified less than this long ago may change again within the same file-system timestamp
# tick without its size changing: its stamp is not trusted yet (git's "racily clean" index entries)
RACY_NS = 1_000_000_000
_POLL_SECONDS = 0.05  # how often a save waiting for the write window looks whether its client went away



class FileHandle:
    """This process's access to one duckdb file, held only while a request needs it.

    duckdb locks a file per process: while this server holds any connection to it (even read-only),
    the owner's own ``pipeline.run()`` or ``dlt.dataset()`` cannot open it. So there is no connection
    between requests: the process holds ONE connection to the file (one duckdb database instance) while
    any request needs it, opened by the first and closed by the last (a stream keeps its share until it
    is read to the end or dropped). Reads open it read-only; a save opens it read-write and dlt borrows
    it for the load (dlt's duckdb client takes a connection and works on ``duplicate()`` s of it, so the
    load runs in this same database instance). duckdb cannot hold a file read-only and read-write in one
    process at once, hence one instance, shared:

    - *Reads never wait on saves* (issue 22 §4): while a save holds the read-write instance, a read takes
      a cursor of that instance and sees the last committed data (duckdb's MVCC; the load's transaction
      is invisible until it commits). The instance stays open until its last reader is done, and a save
      arriving meanwhile uses it as it is.
    - A save that finds the file open read-only waits until those reads end (new reads wait behind it, to
      be served by the save's instance as soon as it is open; the save is not starved), at most
      :data:`BUSY_TIMEOUT` (then the save gets UNAVAILABLE, "busy with reads", and the reads go on).
    - Opening waits with backoff while another process holds the file and gives up after
      :data:`BUSY_TIMEOUT` seconds with UNAVAILABLE ("held by another process, retry"). A file that
      does not exist yet reads as empty; the first write creates it.

    Fairness to other processes: overlapping reads never hold the file longer than :data:`HOLD_SECONDS`
    at a stretch (then a gap of :data:`GAP_SECONDS`), unless a save holds it. A thread that already
    holds a read never waits for a second one (re-entrant); inside its write window, a read is a cursor
    of the write connection.
    """

    def __init__(self, path: str, destination: str | None = None) -> None:
        self.path = path
        # how errors name the file: by its destination, not by where it lives
        self.label = f"the duckdb file of destination '{destination}'" if destination else "the duckdb file"
        self._cond = threading.Condition()
        self._write_queue: deque[int] = deque()  # threads waiting for the write window, in arrival order
        self._readers = 0
        self._con: duckdb.DuckDBPyConnection | None = None  # the process's one connection to the file
        self._writable = False  # the connection was opened read-write (by a save)
        self._writer: int | None = None  # the thread that holds the write window
        self._writers_waiting = 0
        self._holders: dict[int, tuple[int, float]] = {}  # id(cursor) -> (its thread, when taken)
        self._opened_at = 0.0  # when the connection was opened (or a drain given up)
        self._drain_until = 0.0  # while in the future: no new reads, the open ones finish, the file closes
        self._free_until = 0.0  # the gap after a drain: the file stays closed until then

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        delay, deadline = 0.02, time.monotonic() + BUSY_TIMEOUT
        while True:
            try:
                return duckdb.connect(self.path, read_only=read_only)
            except duckdb.Error as exc:
                if "lock" not in str(exc).lower() or time.monotonic() + delay > deadline:
                    raise open_error(self.label, exc) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def exists(self) -> bool:
        return Path(self.path).is_file()

    def _read_wait(self, now: float) -> float:
        """How long a new read (of a thread holding none) waits before it looks again; 0 when it may
        go ahead. Called under the condition."""
        if self._writer is not None or self._writers_waiting:
            # a save holds or wants the file: join its read-write instance once it is open (MVCC: the
            # last committed data); until then (it waits for read-only reads to end, or opens) wait
            return 0.0 if self._con is not None and self._writable else BUSY_TIMEOUT
        if self._con is None:
            return max(self._free_until - now, 0.0)
        if self._drain_until <= self._opened_at and now - self._opened_at > HOLD_SECONDS:
            oldest = min((taken for _, taken in self._holders.values()), default=now)
            if now - oldest < DRAIN_SECONDS:  # short reads only: they end soon, then the file is let go
                self._drain_until = now + DRAIN_SECONDS
            else:  # a long stream holds the file anyway: a drain would only delay others
                self._opened_at = now
        if self._drain_until > self._opened_at:
            if now < self._drain_until:
                return self._drain_until - now
            self._opened_at = now  # the open reads did not end in time: give up this drain
        return 0.0

    def acquire_read(self) -> duckdb.DuckDBPyConnection:
        """A cursor on the process's connection to the file; :meth:`release_read` when done with it.
        Inside this thread's write window, a cursor of the write connection (no share taken)."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me and self._con is not None:
                return self._con.cursor()
            if all(thread != me for thread, _ in self._holders.values()):
                # a save's wait is bounded (BUSY_TIMEOUT for reads to end, as long again to open the
                # file): this deadline is only reached while another process holds the file
                deadline = time.monotonic() + 3 * BUSY_TIMEOUT
                while wait := self._read_wait(now := time.monotonic()):
                    left = deadline - now
                    if left <= 0:
                        raise Unavailable(f"{self.label} is held by another process; retry")
                    self._cond.wait(min(left, max(wait, 0.01)))
            if self._con is None:
                self._con = self._connect(read_only=True)
                self._writable = False
                self._opened_at = time.monotonic()
            self._readers += 1
            cursor = self._con.cursor()
            self._holders[id(cursor)] = (me, time.monotonic())
            return cursor

    def _close_if_unused(self) -> None:
        """Close the connection when no read and no save needs it (under the condition)."""
        if self._readers == 0 and self._writer is None and self._con is not None:
            self._con.close()
            self._con, self._writable = None, False
            if self._drain_until > self._opened_at:  # a drain ended: the gap for other processes
                self._free_until = time.monotonic() + GAP_SECONDS
                self._drain_until = 0.0
        self._cond.notify_all()

    def release_read(self, cursor: duckdb.DuckDBPyConnection) -> None:
        with self._cond:
            cursor.close()
            if self._holders.pop(id(cursor), None) is None:
                return  # a cursor of the write connection: no read share was taken
            self._readers -= 1
            self._close_if_unused()

    @contextlib.contextmanager
    def reading(self) -> Iterator[duckdb.DuckDBPyConnection]:
        cursor = self.acquire_read()
        try:
            yield cursor
        finally:
            self.release_read(cursor)

    @contextlib.contextmanager
    def writing(self, cancelled: Callable[[], bool] | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """The read-write connection, for one write (re-entrant in its thread). ``cancelled``: the caller's,
        polled while it waits: a save whose client went away leaves the queue (review of issue 22, R3)."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                yield self._con  # type: ignore[misc]
                return
            self._writers_waiting += 1  # new reads wait behind this save
            self._write_queue.append(me)
            try:
                # saves to other datasets of this file queue for the window in arrival order, as saves to
                # one dataset do (review of issue 22, F10: the second failed "busy with reads" after 10 s)
                deadline = time.monotonic() + WRITE_LOCK_TIMEOUT
                while self._writer is not None or self._write_queue[0] != me:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Unavailable(f"{self.label} is busy with another save; nothing was written, retry")
                    if cancelled is not None and cancelled():
                        raise Cancelled("the save was cancelled by its client while it waited for another save "
                                        "to end; nothing was written")
                    self._cond.wait(min(left, _POLL_SECONDS) if cancelled is not None else left)
                # read-only reads must end (one process cannot hold the file both ways); reads of a
                # read-write instance go on while the save uses the same instance
                deadline = time.monotonic() + BUSY_TIMEOUT
                while self._readers and not self._writable:
                    left = deadline - time.monotonic()
                    if left <= 0:  # a stream still open (a slow or idle reader): never wait without bound
                        raise Unavailable(f"{self.label} is busy with reads; nothing was written, retry")
                    self._cond.wait(left)
            finally:
                self._write_queue.remove(me)
                self._writers_waiting -= 1
                self._cond.notify_all()
            self._writer = me
            opened = self._con
        try:
            if opened is None:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                con = self._connect(read_only=False)
                with self._cond:
                    self._con, self._writable, self._opened_at = con, True, time.monotonic()
                    self._cond.notify_all()  # reads waiting for this save join its instance
            yield self._con  # type: ignore[misc]
        finally:
            with self._cond:
                self._writer = None
                self._close_if_unused()

    @property
    def write_connection(self) -> duckdb.DuckDBPyConnection | None:
        """The open write connection, when the calling thread holds the write window."""
        return self._con if self._writer == threading.get_ident() else None


_handles: dict[str, FileHandle] = {}
_handles_lock = threading.Lock()


def file_handle(path: str, destination: str | None = None) -> FileHandle:
    """The process-wide handle of one duckdb file (``destination``: how its errors name it)."""
    with _handles_lock:
        handle = _handles.get(path)
        if handle is None:
            handle = _handles[path] = FileHandle(path, destination)
        return handle


class DuckDBStorage(Storage):
    """One dataset (a duckdb schema) inside one duckdb file."""

    serves_load_history = True  # _dlt_loads is a table here (domain/storage.py)

    def __init__(self, dataset: DatasetConfig, destination: DestinationConfig, batch_rows: int = 122_880) -> None:
        super().__init__(dataset, destination)
        assert destination.location is not None
        self.path = destination.location
        self.batch_rows = batch_rows
        self.file = file_handle(self.path, destination.name)
        self._data_version: tuple[Any, Any] | None = None  # (version_stamp, data_version), see data_version()

    # the owner's pipelines load into the same file between our requests: re-read the schema like
    # other shared destinations do
    schema_ttl = SHARED_SCHEMA_TTL

    def _one(self, sql: str, params: list[Any] | None = None) -> Any:
        """The first row of a query, on a connection held for this call only."""
        with self.file.reading() as cursor:
            return cursor.execute(sql, params or []).fetchone()

    def writing(self, cancelled: Callable[[], bool] | None = None) -> Any:
        """The write window of the file: one read-write connection that dlt borrows for the load."""
        return self.file.writing(cancelled)

    def _load_stored_schemas(self) -> list[StoredSchema]:
        if not self.file.exists() and self.file.write_connection is None:
            return []  # nothing loaded yet, and reading must not create the file
        with self.file.reading() as cursor:  # one hold of the file for both queries
            exists = cursor.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = '_dlt_version'",
                [self.dataset.name],
            ).fetchone()
            if not exists or not exists[0]:
                return []
            rows = cursor.execute(newest_schemas_sql(f"{quote(self.dataset.name)}._dlt_version")).fetchall()
        return [StoredSchema.from_row(*row) for row in rows]

    def forget_schema_version(self, schema_name: str, version_hash: str) -> None:
        with self.file.writing() as con:
            con.execute(
                f"DELETE FROM {quote(self.dataset.name)}._dlt_version WHERE schema_name = ? AND version_hash = ?",
                [schema_name, version_hash],
            )

    def _existing(self, con: duckdb.DuckDBPyConnection, schema: str, tables: Sequence[str]) -> list[str]:
        """The ones of ``tables`` that exist in ``schema``, compared as duckdb resolves names: without
        regard to case (``"report"`` is the owner's ``Report``)."""
        names = {r[0].lower() for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", [schema]).fetchall()}
        return [t for t in tables if t.lower() in names]

    def physical_table(self, table: str) -> str | None:
        if not self.file.exists() and self.file.write_connection is None:
            return None  # no file yet: no table (and reading must not create it)
        with self.file.reading() as cursor:
            row = cursor.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = ? "
                                 "AND lower(table_name) = lower(?)", [self.dataset.name, table]).fetchone()
        return row[0] if row else None

    def _table_oids(self, con: duckdb.DuckDBPyConnection) -> dict[int, str]:
        return {oid: name for name, oid in con.execute(
            "SELECT table_name, table_oid FROM duckdb_tables() WHERE schema_name = ?", [self.dataset.name]).fetchall()}

    def savepoint(self, tables: Sequence[str]) -> Callable[[], None] | None:
        """A load changes the existing tables in one transaction (:data:`SQL_SAVE_SETTINGS`), but
        dlt creates new tables before it, in a transaction of its own: a failed load drops them again -
        only tables that the load itself created (a table whose oid existed before is never dropped,
        whatever its name's letter case)."""
        with self.file.writing() as con:  # re-entrant: the writer holds the write window already
            existing = set(self._existing(con, self.dataset.name, tables))
            before = set(self._table_oids(con))
        new = {t.lower() for t in tables if t not in existing}
        if not new:
            return None

        def drop() -> None:
            with self.file.writing() as con:
                for oid, table in self._table_oids(con).items():
                    if oid not in before and table.lower() in new:
                        con.execute(f"DROP TABLE IF EXISTS {quote(self.dataset.name)}.{quote(table)}")

        return drop

    def clear_staging(self, tables: Sequence[str]) -> None:
        staging = staging_dataset(self.dataset.name)
        with self.file.writing() as con:
            for table in self._existing(con, staging, tables):
                con.execute(f"DELETE FROM {quote(staging)}.{quote(table)}")

    def capabilities(self) -> Any:
        return dlt.destinations.duckdb().capabilities()

    def dlt_destination(self) -> Any:
        # inside the write window dlt borrows its connection (a second one to the file would hit
        # duckdb's lock); outside it dlt would open the file itself
        con = self.file.write_connection
        if con is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        return dlt.destinations.duckdb(con if con is not None else self.path,
                                       destination_name=self.destination_config.name,
                                       **SQL_SAVE_SETTINGS)  # all-or-nothing replace and merge (domain/storage.py)

    @property
    def location(self) -> str:
        return f"duckdb:///{self.path.lstrip('/')}" if self.path.startswith("/") else f"duckdb:///{self.path}"

    stamps_versions = True

    def version_stamp(self) -> Any:
        """The file's and its WAL's (mtime, size, inode): every write, by this server or another process,
        appends to the WAL or rewrites the file. None while either was modified within :data:`RACY_NS`."""
        now, stamp = time.time_ns(), list[tuple[int, int, int] | None]()
        for path in (self.path, self.path + ".wal"):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                stamp.append(None)
                continue
            if now - st.st_mtime_ns < RACY_NS:
                return None
            stamp.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamp)

    def data_version(self) -> Any:
        """The stored schema's hash and the newest dlt load id: every write to the file is a dlt load.
        Remembered while :meth:`version_stamp` stays the same (no need to open the file to know it)."""
        stamp = self.version_stamp()
        known = self._data_version
        if stamp is not None and known is not None and known[0] == stamp:
            return known[1]
        schemas = self.stored_schemas()
        if not schemas:
            return None
        try:
            row = self._one(f"SELECT max(load_id) FROM {quote(self.dataset.name)}._dlt_loads")
        except duckdb.Error:
            return None
        version = (tuple(s.version_hash for s in schemas), row[0] if row else None)
        self._data_version = (stamp, version) if stamp is not None else None
        return version

    def invalidate(self) -> None:
        super().invalidate()
        self._data_version = None

    def served_schema(self, table: str, columns: dict[str, Any]) -> pa.Schema:
        """What duckdb itself streams for the table's columns - dlt's ``dataset()`` reads duckdb's own Arrow
        too (a ``timestamp`` with a time zone is always microseconds there, whatever its precision hint) -
        with NOT NULL where dlt stored ``nullable: false`` and the column is ``NOT NULL`` in the file
        (duckdb's Arrow export marks nothing non-nullable by itself)."""
        sql = select_sql(self.dataset.name, table, [quote(c) for c in columns], None, 0)
        with self.file.reading() as cursor:
            cursor.execute("SET TimeZone = 'UTC'")
            try:
                schema = plain_arrow(cursor.sql(sql).to_arrow_reader(self.batch_rows).schema)
            except duckdb.CatalogException:  # a column the schema knows and the table lacks: dlt's mapping
                return super().served_schema(table, columns)
            enforced = {r[0] for r in cursor.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ? "
                "AND is_nullable = 'NO'", [self.dataset.name, table]).fetchall()}
        return with_not_null(schema, not_null_hints(columns) & enforced)

    def row_count(self, table: str) -> int:
        self.table_columns(table)  # NotFound for unknown tables
        row = self._one(f"SELECT count(*) FROM {quote(self.dataset.name)}.{quote(table)}")
        return int(row[0]) if row else -1

    def partitions(self, table: str, target_rows: int) -> list[Partition]:
        """Row-id ranges: duckdb pushes ``rowid`` bounds into its scan (only the row groups in range
        are read) and returns rows in insertion order. Ranges span ``0..max(rowid)`` so rows left
        after deletes are covered; the last range is open-ended."""

        self.table_columns(table)  # NotFound for unknown tables
        rows, top = self._one(f"SELECT count(*), max(rowid) FROM {quote(self.dataset.name)}.{quote(table)}")
        n = split_evenly(int(rows), target_rows)
        if n == 1:
            return [Partition({}, int(rows))]
        extent = int(top) + 1
        edges = [extent * i // n for i in range(n)] + [None]
        parts = [Partition({"rowid": [edges[i], edges[i + 1]]}, int(rows) // n) for i in range(n)]
        parts[-1] = Partition(parts[-1].spec, int(rows) - sum(p.records for p in parts[:-1]))
        return parts

    def reader(self, table: str, columns: Sequence[str] | None, limit: int | None,
               partition: Mapping[str, Any] | None = None,
               where: Sequence[Predicate] | None = None) -> pa.RecordBatchReader:
        schema = self.arrow_schema(table, columns)
        conditions = []
        if partition:
            start, stop = int_range(partition, "rowid")
            conditions.append(f"rowid >= {start}" + (f" AND rowid < {stop}" if stop is not None else ""))
        if where:  # a SQL query's filters: duckdb skips row groups by their zone maps
            kept, complete = applicable(where, self.arrow_schema(table), _dlt_types(self.table_columns(table)))
            clause = where_sql(kept, quote) if kept else None
            if clause:
                conditions.append(clause)
            if not complete:
                limit = None  # a row limit holds only over the query's full filter
        sql = select_sql(self.dataset.name, table, [quote(c) for c in schema.names],
                         " AND ".join(conditions) or None, limit)
        cursor = self.file.acquire_read()
        try:
            # dlt advertises timestamptz as tz=UTC; with the session in UTC duckdb streams exactly that
            # (otherwise it names the host's zone and every batch would need a cast)
            cursor.execute("SET TimeZone = 'UTC'")
            reader = conform(cursor.sql(sql).to_arrow_reader(self.batch_rows), schema)
        except BaseException:
            self.file.release_read(cursor)
            raise
        # the file's share is held until the stream is read to its end or dropped (lifetime.owning_reader)
        return owning_reader(reader, cursor, on_close=lambda: self.file.release_read(cursor))
