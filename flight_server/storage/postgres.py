"""A dataset in PostgreSQL, loaded by dlt's ``postgres`` destination (a schema named like the dataset).

Credentials are resolved by dlt (the project file's ``credentials`` — a connection string or a
mapping — or dlt's config providers), then used by ADBC's PostgreSQL driver, which reads results as
Arrow directly (binary COPY): ``cursor.execute(sql); cursor.fetch_record_batch()`` is an Arrow C++
stream handed to Flight unchanged. Projection and LIMIT are pushed into the SQL.

An ADBC stream is only valid while its cursor and connection live, so each read borrows a pooled
connection that goes back to the pool when the stream ends or is dropped (:mod:`.lifetime`). Reads run
in autocommit mode, so no transaction (and no lock) is left open between requests — dlt's replace
loads need exclusive locks. Queries from the SQL sandbox run inside ``BEGIN READ ONLY`` and the
connection is rolled back and reset before reuse.

Row counts are exact (``count(*)``): FlightInfo's ``total_records`` is promised to clients as the
number of rows a read returns, and an estimate (``pg_class.reltuples``) would break that promise.

The password is never put into a message: errors from the driver are re-raised with a text of our
own plus the driver's message with the connection URI scrubbed.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import dlt
import pyarrow as pa

from flight_server.domain.config import DatasetConfig, DestinationConfig
from flight_server.domain.errors import Cancelled, InvalidRequest, SqlLimitExceeded, Unavailable
from flight_server.domain.identifiers import literal as _literal
from flight_server.domain.identifiers import quote
from flight_server.domain.lifetime import _Lease, isolated, owning_reader
from flight_server.domain.pushdown import Predicate, applicable, where_sql
from flight_server.domain.pushdown import dlt_types as _dlt_types
from flight_server.domain.reachability import is_unreachable, unreachable
from flight_server.domain.storage import (
    SHARED_SCHEMA_TTL,
    SQL_SAVE_SETTINGS,
    Partition,
    Storage,
    StoredSchema,
    conform,
    int_range,
    newest_schemas_sql,
    not_null_hints,
    select_sql,
    split_evenly,
    staging_dataset,
)
from flight_server.domain.warehouse import WAREHOUSE_QUERIES

log = logging.getLogger(__name__)

WEI_ARROW = pa.decimal128(38, 0)  # dlt's dataset() read of a wei column (docs/type-mapping.md)
POOL_SIZE = 4  # idle connections kept; more are opened under load and closed when returned to a full pool
# queries of this process running in PostgreSQL at once (warehouse_query; like the sandbox's SANDBOX_WORKERS):
# a flood of clients must not hold a connection each (review finding: 57 connections for 140 clients); the
# router shares them fairly between users (domain/warehouse.py), this bounds every caller together
_WAREHOUSE_SLOTS = threading.BoundedSemaphore(WAREHOUSE_QUERIES)
WAREHOUSE_WAIT = 1.0  # seconds a query waits for a slot



def _column_sql(name: str, data_type: str | None) -> str:
    """A column as selected for streaming: ADBC hands ``json`` and ``numeric`` out as extension types
    (``arrow.json``, an opaque string); as text they cast to dlt's Arrow types (string, decimal) in C++.
    ``trim_scale`` drops the zeros of e.g. ``numeric(156,78)`` (dlt's ``wei``) that exceed Arrow's
    decimal precision."""
    q = quote(name)
    if data_type == "json":
        return f"{q}::text AS {q}"
    if data_type in ("decimal", "wei"):
        return f"trim_scale({q})::text AS {q}"
    return q


def _plain_schema(schema: pa.Schema) -> pa.Schema:
    """ADBC's result schema without its PostgreSQL type tags (field metadata) and with extension
    types (``arrow.json``; ``arrow.opaque`` for ``numeric`` of unknown scale) as their storage type:
    text, which every Arrow client reads. Table reads select such columns as text and cast them to
    dlt's types; SQL results keep them as text (cast in SQL, e.g. ``sum(x)::bigint``, for numbers)."""
    fields = []
    for f in schema:
        t = f.type.storage_type if isinstance(f.type, pa.BaseExtensionType) else f.type
        fields.append(pa.field(f.name, t, f.nullable))
    return pa.schema(fields)


class _Pool:
    """A small pool of ADBC connections (autocommit) to one database."""

    def __init__(self, uri: str, size: int = POOL_SIZE) -> None:
        self._uri = uri
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue(size)
        self._pids: dict[int, int] = {}  # id(connection) -> its backend's process id, for live connections

    def connect(self) -> Any:
        import adbc_driver_postgresql.dbapi as pg

        con = pg.connect(self._uri, autocommit=True)
        try:
            cur = con.cursor()
            try:
                cur.execute("SELECT pg_backend_pid()")
                self._pids[id(con)] = int(cur.fetchone()[0])
            finally:
                _close_quietly(cur)
        except BaseException:
            _close_quietly(con)
            raise
        return con

    def pid(self, con: Any) -> int | None:
        """The process id of ``con``'s backend (to end it from another connection)."""
        return self._pids.get(id(con))

    def discard(self, con: Any) -> None:
        """Close a connection that is not coming back to the pool."""
        self._pids.pop(id(con), None)
        _close_quietly(con)

    def take(self) -> Any:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return self.connect()

    def give(self, con: Any) -> None:
        try:
            self._idle.put_nowait(con)
        except queue.Full:
            self.discard(con)

    def close(self) -> None:
        while True:
            try:
                self.discard(self._idle.get_nowait())
            except queue.Empty:
                return


_WATCH_SECONDS = 0.05
# a statement cancelled by the watch that is still on after this is ended with its backend: PostgreSQL
# does not act on a cancel while it waits to write to a client that stopped reading (ClientWrite), so such
# a statement would hold its snapshot and its table locks (the owner's next load waits) for ever
_CANCEL_GRACE_SECONDS = 1.0
#: a plain read (not SQL) whose consumer takes no batch for this long is ended the same way: a client that
#: stops reading a table must not hold a PostgreSQL session and its locks (issue 22; SQL has its idle limit)
READ_IDLE_SECONDS = 60.0


class _GuardFailed(Exception):
    """A guard of a warehouse query answered true."""


class _Watch:
    """Cancels a cursor's statement at a deadline, when the caller cancels while it waits for rows, or when
    the caller has not asked for rows for ``idle`` seconds."""

    def __init__(self, cur: Any, deadline: float, cancelled: Callable[[], bool] | None,
                 idle: float | None = None, terminate: Callable[[], object] | None = None) -> None:
        self.cur, self.deadline, self.cancelled, self.idle = cur, deadline, cancelled, idle
        self._terminate = terminate
        self.outcome: str | None = None  # "timeout" | "cancelled" | "idle"
        self._waiting = False
        self._last = time.monotonic()  # when the caller last had its rows
        self._done = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="flight-share-warehouse-watch", daemon=True).start()

    def waiting(self, step: Callable[[], Any]) -> Any:
        with self._lock:
            self._waiting = True
        try:
            return step()
        finally:
            with self._lock:
                self._waiting = False
                self._last = time.monotonic()

    def _run(self) -> None:
        while not self._done.wait(_WATCH_SECONDS):
            with self._lock:
                if self._done.is_set():
                    return
                if time.monotonic() >= self.deadline:
                    self.outcome = "timeout"
                elif self._waiting and self.cancelled is not None and self.cancelled():
                    self.outcome = "cancelled"  # polled only while the caller's call is still on
                elif not self._waiting and self.idle is not None and time.monotonic() - self._last >= self.idle:
                    self.outcome = "idle"  # a stream its caller does not read: the statement ends (PostgreSQL
                    # then ends the transaction too: idle_in_transaction_session_timeout, see warehouse_query)
                if self.outcome:
                    try:
                        self.cur.adbc_cancel()
                    except Exception:  # noqa: BLE001 - the statement ended meanwhile
                        pass
                    break
        if self.outcome and self._terminate is not None and not self._done.wait(_CANCEL_GRACE_SECONDS):
            try:
                self._terminate()  # still not given back: the backend waits on its client (see above)
            except Exception:  # noqa: BLE001 - the database may be gone too; the stream's end cleans up
                log.warning("could not end a PostgreSQL backend whose stream is not read", exc_info=True)

    def stop(self) -> None:
        with self._lock:  # after this, no cancel is on its way to the connection's next statement
            self._done.set()


_PG_ERROR = re.compile(r"ERROR:\s+(.*)")


def _pg_message(text: str) -> str:
    """PostgreSQL's own message out of the driver's text (``... ERROR:  division by zero``), one line."""
    match = _PG_ERROR.search(text)
    line = (match.group(1) if match else text).strip().splitlines()
    return line[0].strip() if line else ""


def _close_quietly(obj: Any) -> None:
    try:
        obj.close()
    except Exception:  # noqa: BLE001 - closing a broken connection
        pass


class PostgresStorage(Storage):
    """One dataset (a PostgreSQL schema) in one database."""

    serves_load_history = True  # _dlt_loads is a table here (domain/storage.py)

    schema_ttl = SHARED_SCHEMA_TTL  # other replicas and pipelines load into the same database

    def __init__(self, dataset: DatasetConfig, destination: DestinationConfig, batch_rows: int = 122_880) -> None:
        super().__init__(dataset, destination)
        self.batch_rows = batch_rows
        self._credentials: Any = None
        self._pool: _Pool | None = None

    # --- dlt --------------------------------------------------------------------------------
    def dlt_destination(self) -> Any:
        return dlt.destinations.postgres(
            credentials=self.destination_config.credentials, destination_name=self.destination_config.name,
            **SQL_SAVE_SETTINGS,  # all-or-nothing replace and merge (domain/storage.py)
        )

    def capabilities(self) -> Any:
        return dlt.destinations.postgres().capabilities()

    def credentials(self) -> Any:
        """dlt's resolved PostgresCredentials (from the project file or dlt's config providers)."""
        with self._lock:
            if self._credentials is None:
                from dlt.common.configuration.exceptions import ConfigurationException
                from dlt.dataset.utils import get_destination_clients

                try:
                    client = isolated(  # dlt resolves its config here: see lifetime.isolated
                        get_destination_clients, dlt.Schema("flight_share"), self.dlt_destination(), self.dataset.name
                    )[0]
                except ConfigurationException as exc:
                    raise Unavailable(
                        f"credentials of destination '{self.destination_config.name}' are incomplete: "
                        f"{type(exc).__name__}; set them in the project file or dlt's config",
                        destination=self.destination_config.name,
                    ) from None
                self._credentials = client.config.credentials
            return self._credentials

    @property
    def location(self) -> str:
        try:
            c = self.credentials()
        except Unavailable:
            return f"postgres://***/{self.dataset.name}"
        port = f":{c.port}" if c.port else ""
        user = f"{c.username}:***@" if c.username else ""
        return f"postgres://{user}{c.host}{port}/{c.database}"

    # --- connections ------------------------------------------------------------------------
    def pool(self) -> _Pool:
        with self._lock:
            if self._pool is None:
                self._pool = _Pool(self.credentials().to_native_representation())
            return self._pool

    def _scrub(self, text: str) -> str:
        c = self.credentials()
        for secret in {c.to_native_representation(), str(c.password or "")} - {""}:
            text = text.replace(secret, "***")
        return text

    def _fail(self, exc: Exception, what: str) -> Exception:
        """A driver error as a domain error whose text holds no secret."""
        import adbc_driver_manager

        if is_unreachable(exc):  # libpq names the host and port it tried: the destination is named instead
            return unreachable(self.destination_config.name, self.dataset.name, what)
        detail = self._scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        message = f"{what} failed on destination '{self.destination_config.name}': {detail}"
        if isinstance(exc, adbc_driver_manager.ProgrammingError):
            return InvalidRequest(message, dataset=self.dataset.name)
        return Unavailable(message, dataset=self.dataset.name)

    def _stream(self, sql: str, read_only_transaction: bool = False, what: str = "read") -> pa.RecordBatchReader:
        """Run one statement and return its Arrow stream; the connection returns to the pool after it."""
        pool = self.pool()
        for attempt in (0, 1):
            try:
                con = pool.take()
            except Exception as exc:  # noqa: BLE001 - cannot connect
                raise self._fail(exc, "connecting") from None
            cur = con.cursor()
            try:
                if read_only_transaction:
                    cur.execute("BEGIN TRANSACTION READ ONLY")
                cur.execute(sql)
                reader = cur.fetch_record_batch()
            except Exception as exc:  # noqa: BLE001
                broken = self._release(con, cur, read_only_transaction)
                if broken and attempt == 0:
                    continue  # a stale pooled connection: once more on a fresh one
                raise self._fail(exc, what) from None
            bare = _plain_schema(reader.schema)
            if not reader.schema.equals(bare, check_metadata=True):
                reader = reader.cast(bare)
            watch = _Watch(cur, math.inf, None, READ_IDLE_SECONDS, self._terminator(con))

            def end(con: Any = con, cur: Any = cur, reader: Any = reader, watch: _Watch = watch) -> None:
                watch.stop()
                self._release(con, cur, read_only_transaction, reader)
            watched = self._watched(reader, watch, functools.partial(self._read_error, watch=watch, what=what))
            return owning_reader(watched, con, cur, on_close=end)
        raise AssertionError("unreachable")

    def _terminator(self, con: Any) -> Callable[[], object] | None:
        """Ends ``con``'s backend from another connection (a role may end its own backends)."""
        pid = self.pool().pid(con)
        if pid is None:
            return None
        return lambda: self._execute([f"SELECT pg_terminate_backend({int(pid)})"], "ending an unread stream")

    @staticmethod
    def _watched(reader: pa.RecordBatchReader, watch: _Watch,
                 error: Callable[[Exception], Exception]) -> pa.RecordBatchReader:
        """``reader``, each batch taken under ``watch`` (its deadline and idle limit); ``error`` words its errors."""
        def batches() -> Iterator[pa.RecordBatch]:
            while True:
                try:
                    batch = watch.waiting(reader.read_next_batch)
                except StopIteration:
                    return
                except Exception as exc:  # noqa: BLE001
                    raise error(exc) from None
                yield batch
        return pa.RecordBatchReader.from_batches(reader.schema, batches())

    def _read_error(self, exc: Exception, watch: _Watch, what: str) -> Exception:
        """A plain read's error in the domain's words (the idle limit's own when the watch ended it)."""
        if watch.outcome == "idle" and watch.idle is not None:
            return InvalidRequest(f"the {what} was not read for {watch.idle:g} s, so the server ended it; read a "
                                  "stream as it arrives", dataset=self.dataset.name, limit="idle read stream",
                                  value=watch.idle)
        return self._fail(exc, what)

    def _release(self, con: Any, cur: Any, in_transaction: bool, reader: Any = None) -> bool:
        """Return a connection to the pool (rolled back, reset); True if it was broken instead."""
        if reader is not None:
            _close_quietly(reader)  # an unfinished stream first, or the connection stays busy
        _close_quietly(cur)
        try:
            c = con.cursor()
            try:
                if in_transaction:
                    c.execute("ROLLBACK")
                c.execute("RESET ALL")
            finally:
                _close_quietly(c)
        except Exception:  # noqa: BLE001 - a broken connection is dropped
            self.pool().discard(con)
            return True
        self.pool().give(con)
        return False

    def _scalar(self, sql: str, what: str) -> Any:
        reader = self._stream(sql, what=what)
        table = reader.read_all()
        return table.column(0)[0].as_py() if table.num_rows else None

    # --- schema -----------------------------------------------------------------------------
    def _load_stored_schemas(self) -> list[StoredSchema]:
        exists = self._scalar(
            "SELECT count(*) FROM information_schema.tables "
            f"WHERE table_schema = {_literal(self.dataset.name)} AND table_name = '_dlt_version'",
            "reading the stored schema",
        )
        if not exists:
            return []
        reader = self._stream(newest_schemas_sql(f"{quote(self.dataset.name)}._dlt_version"),
                              what="reading the stored schema")
        return [StoredSchema.from_row(row["version"], row["version_hash"], json.loads(row["schema"]))
                for row in reader.read_all().to_pylist()]

    def forget_schema_version(self, schema_name: str, version_hash: str) -> None:
        self._execute([f"DELETE FROM {quote(self.dataset.name)}._dlt_version WHERE schema_name = {_literal(schema_name)} "
                       f"AND version_hash = {_literal(version_hash)}"], "removing a schema version")

    def _execute(self, statements: Sequence[str], what: str, fetch: bool = False) -> list[tuple[Any, ...]]:
        """Run statements on a pooled (autocommit) connection; the rows of the last if ``fetch``."""
        con = self.pool().take()
        rows: list[tuple[Any, ...]] = []
        try:
            cur = con.cursor()
            try:
                for sql in statements:
                    cur.execute(sql)
                if fetch:
                    rows = list(cur.fetchall())
            finally:
                _close_quietly(cur)
        except Exception as exc:  # noqa: BLE001
            self.pool().discard(con)
            raise self._fail(exc, what) from None
        self.pool().give(con)
        return rows

    def physical_table(self, table: str) -> str | None:
        return next(iter(self._existing(self.dataset.name, [table])), None)

    def _existing(self, schema: str, tables: Sequence[str]) -> list[str]:
        names = {r[0] for r in self._execute(
            [f"SELECT table_name FROM information_schema.tables WHERE table_schema = {_literal(schema)}"],
            "listing tables", fetch=True)}
        return [t for t in tables if t in names]

    def savepoint(self, tables: Sequence[str]) -> Callable[[], None] | None:
        """A load changes the existing tables in one transaction (:data:`SQL_SAVE_SETTINGS`), but
        dlt creates new tables before it, in a transaction of its own: a failed load drops them again
        (only tables that did not exist before the load)."""
        existing = set(self._existing(self.dataset.name, tables))
        new = [t for t in tables if t not in existing]
        if not new:
            return None

        def drop() -> None:
            self._execute([f"DROP TABLE IF EXISTS {quote(self.dataset.name)}.{quote(t)}" for t in new],
                          "dropping the new tables of a failed load")

        return drop

    def clear_staging(self, tables: Sequence[str]) -> None:
        staging = staging_dataset(self.dataset.name)
        present = self._existing(staging, tables)
        if present:
            self._execute([f"DELETE FROM {quote(staging)}.{quote(t)}" for t in present], "emptying staging tables")

    # --- reading ----------------------------------------------------------------------------
    def arrow_schema_for(self, columns: dict[str, Any]) -> pa.Schema:
        """dlt's mapping with PostgreSQL's capabilities, except ``wei``: PostgreSQL stores it as
        ``numeric(156,78)``, and dlt's ``dataset()`` types it ``decimal(38,0)`` (its SQL lineage has no
        wei) - ``decimal128(38, 0)`` here too, read as ``trim_scale(...)::text`` (see :func:`_column_sql`)."""
        schema = super().arrow_schema_for(columns)
        return pa.schema([f.with_type(WEI_ARROW) if columns[f.name].get("data_type") == "wei" else f for f in schema])

    def not_null_columns(self, table: str, columns: dict[str, Any]) -> set[str]:
        """dlt's ``nullable: false`` columns that are ``NOT NULL`` in the table."""
        wanted = not_null_hints(columns)
        if not wanted:
            return wanted
        rows = self._execute([f"SELECT column_name FROM information_schema.columns WHERE table_schema = "
                              f"{_literal(self.dataset.name)} AND table_name = {_literal(table)} AND is_nullable = 'NO'"],
                             "reading the table's columns", fetch=True)
        return wanted & {r[0] for r in rows}

    def row_count(self, table: str) -> int:
        self.table_columns(table)  # NotFound for unknown tables
        n = self._scalar(f"SELECT count(*) FROM {quote(self.dataset.name)}.{quote(table)}", "counting rows")
        return int(n) if n is not None else -1

    def partitions(self, table: str, target_rows: int) -> list[Partition]:
        """Block ranges of the table's heap: ``ctid`` bounds run as a TID Range Scan (PostgreSQL 14+),
        which reads only those pages, in physical order. Rows per range are estimated from the
        exact total and the page count; the last range is open-ended (pages added since are read)."""

        self.table_columns(table)  # NotFound for unknown tables
        name = _literal(f"{quote(self.dataset.name)}.{quote(table)}")
        reader = self._stream(
            f"SELECT (SELECT count(*) FROM {quote(self.dataset.name)}.{quote(table)}) AS n, "
            f"pg_relation_size({name}::regclass) / current_setting('block_size')::bigint AS pages",
            what="planning a read")
        row = reader.read_all().to_pylist()[0]
        rows, pages = int(row["n"]), int(row["pages"])
        n = split_evenly(rows, target_rows, pages)
        if n == 1:
            return [Partition({}, rows)]
        edges = [pages * i // n for i in range(n)]  # the last range is open-ended (stop None)
        parts = [Partition({"pages": [edges[i], edges[i + 1]]}, rows * (edges[i + 1] - edges[i]) // pages)
                 for i in range(n - 1)]
        parts.append(Partition({"pages": [edges[n - 1], None]}, rows - sum(p.records for p in parts)))
        return parts

    def reader(self, table: str, columns: Sequence[str] | None, limit: int | None,
               partition: Mapping[str, Any] | None = None,
               where: Sequence[Predicate] | None = None) -> pa.RecordBatchReader:
        schema = self.arrow_schema(table, columns)
        conditions = []
        if partition:
            start, stop = int_range(partition, "pages")
            conditions.append(f"ctid >= '({start},0)'::tid" + (f" AND ctid < '({stop},0)'::tid" if stop is not None else ""))
        if where:  # a SQL query's filters run in the warehouse: only matching rows leave it
            kept, complete = applicable(where, self.arrow_schema(table), _dlt_types(self.table_columns(table)))
            condition = where_sql(kept, quote)  # None: nothing kept
            if condition is not None:
                conditions.append(condition)
            if not complete:
                limit = None  # a row limit holds only over the query's full filter
        types = {n: c.get("data_type") for n, c in self.table_columns(table).items()}
        columns_sql = [_column_sql(c, types.get(c)) for c in schema.names]
        reader = self._stream(select_sql(self.dataset.name, table, columns_sql, " AND ".join(conditions) or None, limit))
        return conform(reader, schema)

    # --- SQL in the warehouse (domain/warehouse.py) -------------------------------------------------
    def warehouse_query(self, sql: str, timeout: float, cancelled: Callable[[], bool] | None = None,
                        guards: Sequence[str] = (), remaining: float | None = None,
                        idle: float | None = None) -> pa.RecordBatchReader:
        """Run one query that :mod:`flight_server.domain.warehouse` wrote, read-only, time-limited, cancellable.

        Inside ``BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY`` (nothing can be written,
        even by a statement that slipped through; one snapshot for ``guards`` and the query), with
        ``SET LOCAL`` ``statement_timeout`` = ``timeout``, ``search_path`` = pg_catalog
        (then pg_temp: an unqualified name never resolves in a schema a user can create objects in) and
        ``TimeZone`` = UTC (string literals compared with timestamps read as the sandbox reads them). A
        watcher cancels the statement (``adbc_cancel``) at the deadline, and when ``cancelled()`` says the
        caller went away -- polled only while the caller waits for rows, as the sandbox does. The
        connection is rolled back and reset when the stream ends or is dropped. Errors are domain errors
        with the sandbox's texts for the time limit and cancellation, else ``SQL error: ...`` (no secret).

        ``guards``: queries of one boolean each, run first in the same snapshot; if one answers true the
        query is not run (``InvalidRequest``: the caller runs it elsewhere). ``remaining``: the seconds
        left of ``timeout`` (``server.sql_timeout``, which the time-limit error names) when part of it is spent.
        ``idle``: a stream its caller does not read for this long is ended (statement cancelled, and
        ``idle_in_transaction_session_timeout`` ends the transaction and its locks in PostgreSQL even if the
        caller never comes back): an unread result must not hold a connection, nor locks that the owner's
        next load waits for.
        """
        deadline = time.monotonic() + (timeout if remaining is None else min(remaining, timeout))
        # a short wait: when every slot is busy the router answers from the sandbox (its own bounded pool)
        if not _WAREHOUSE_SLOTS.acquire(timeout=max(min(deadline - time.monotonic(), WAREHOUSE_WAIT), 0)):
            raise Unavailable(f"every warehouse slot is busy ({WAREHOUSE_QUERIES} queries running)",
                              dataset=self.dataset.name)
        try:
            con, cur = self._warehouse_connection()
        except BaseException:
            _WAREHOUSE_SLOTS.release()
            raise
        watch = _Watch(cur, deadline, cancelled, idle, self._terminator(con))
        try:
            remaining_ms = max(int((deadline - time.monotonic()) * 1000), 1)
            idle_ms = max(int(idle * 1000), 1) if idle is not None else 0  # 0: PostgreSQL's "no limit"
            for setting in (f"SET LOCAL statement_timeout = {remaining_ms}", "SET LOCAL search_path = pg_catalog, pg_temp",
                            f"SET LOCAL idle_in_transaction_session_timeout = {idle_ms}",
                            "SET LOCAL TimeZone = 'UTC'",
                            # the SQL's string literals are written for it (a backslash is a character)
                            "SET LOCAL standard_conforming_strings = on"):
                cur.execute(setting)
            for guard in guards:
                if watch.waiting(lambda: (cur.execute(guard), cur.fetchone())[1])[0]:  # noqa: B023 - called at once
                    raise _GuardFailed(guard)
            reader = watch.waiting(lambda: (cur.execute(sql), cur.fetch_record_batch())[1])
        except Exception as exc:  # noqa: BLE001
            watch.stop()
            self._release(con, cur, True)
            _WAREHOUSE_SLOTS.release()
            raise self._warehouse_error(exc, watch, timeout) from None
        bare = _plain_schema(reader.schema)

        def end() -> None:
            watch.stop()
            try:
                self._release(con, cur, True, reader)
            finally:
                _WAREHOUSE_SLOTS.release()

        watched = self._watched(reader, watch, lambda exc: self._warehouse_error(exc, watch, timeout))

        def batches(lease: _Lease) -> Iterator[pa.RecordBatch]:
            # the lease ends the transaction when the stream ends, fails, or is dropped (even unread)
            try:
                for batch in watched:
                    yield batch if batch.schema.equals(bare) else batch.cast(bare)
            finally:
                lease.release()

        return pa.RecordBatchReader.from_batches(bare, batches(_Lease((reader, con, cur), end)))

    def _warehouse_connection(self) -> tuple[Any, Any]:
        """A pooled connection with a cursor inside a read-only snapshot (a stale one is replaced once)."""
        pool = self.pool()
        for attempt in (0, 1):
            try:
                con = pool.take()
            except Exception as exc:  # noqa: BLE001 - cannot connect
                raise self._fail(exc, "connecting") from None
            cur = con.cursor()
            try:
                cur.execute("BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            except Exception as exc:  # noqa: BLE001
                if self._release(con, cur, True) and attempt == 0:
                    continue  # a stale pooled connection: once more on a fresh one
                raise self._fail(exc, "SQL in the warehouse") from None
            return con, cur
        raise AssertionError("unreachable")

    def _warehouse_error(self, exc: Exception, watch: _Watch, timeout: float) -> Exception:
        if isinstance(exc, _GuardFailed):
            return InvalidRequest(f"the warehouse cannot run this query as the sandbox would ({exc})",
                                  dataset=self.dataset.name)
        text = str(exc)
        if watch.outcome == "idle" and watch.idle is not None:  # the watch's own cause first: what it ended
            return SqlLimitExceeded.idle_result(watch.idle, self.dataset.name)
        if watch.outcome == "timeout" or "statement timeout" in text:
            return SqlLimitExceeded.time_limit(timeout, self.dataset.name)
        if watch.outcome == "cancelled":
            return Cancelled("the query was cancelled by its caller", dataset=self.dataset.name)
        if watch.idle is not None and "idle-in-transaction timeout" in text:
            return SqlLimitExceeded.idle_result(watch.idle, self.dataset.name)
        detail = self._scrub(_pg_message(text) or type(exc).__name__)
        return InvalidRequest(f"SQL error: {detail[:500]}", dataset=self.dataset.name)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

