"""One query on one worker, from its request to its end: the table data it reads, its clock, its errors.

In the worker, an in-memory duckdb (opened once per worker with ``enable_external_access=false``,
``lock_configuration=true``, no temp directory, no extension installing/loading, no Python replacement
scans and ``memory_limit``) runs each query on its own cursor inside one transaction that is rolled back
at its end, holding nothing but one view per table the query names (so the next query, maybe another
user's, finds the database as the worker started it). Each view is an Arrow stream the server opens from
the storage adapter's own ``reader()`` only when duckdb scans it, projected to the columns the query uses,
and sends down a pipe; the result comes back as an Arrow IPC stream. The server owns the clock: at
``server.sql_timeout``, when the caller cancels or goes away while waiting, or when a result stream is not
read, it kills the worker. Even a query that slipped past the allow-list could not write the data (the
worker has only read streams), reach files or the network, see another dataset or dlt's internal tables
(they are not there), change its own limits, or take the server's memory.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.ipc

from flight_server.domain.errors import Cancelled, InvalidRequest, SqlLimitExceeded, Unavailable
from flight_server.domain.masking import mask
from flight_server.domain.sql.check import CheckedQuery
from flight_server.domain.sql.rowwise import TablePartition
from flight_server.domain.sql.workers import WorkerPool, exit_text
from flight_server.domain.sql_worker import END, MARK, pipe, send_frame
from flight_server.domain.storage import Storage

# how often a waiting call checks its deadline and whether its caller cancelled
_POLL_SECONDS = 0.05
#: a result stream whose client reads nothing for this long (at most half server.sql_timeout) is ended and its
#: worker freed: a client that opens streams and goes idle must not hold the workers every user shares
SQL_IDLE_SECONDS = 15.0
_MEMORY_TEXT = "query needs more memory than the sandbox allows (server.sql_memory_limit)"

log = logging.getLogger("flight_share.server")

#: a table's stream for a query: (storage, table, columns or None, row limit or None, pushed filters or None),
#: and ``partition=<spec>`` (keyword) when the query runs over one partition of that table
#: (``Storage.partitions``; the caller made sure the spec is one the server planned)
Source = Callable[..., pa.RecordBatchReader]


class JobSettings(Protocol):
    """What a job reads of the sandbox that runs it (:class:`~flight_server.domain.sql.sandbox.SqlSandbox`)."""

    @property
    def max_rows(self) -> int: ...

    @property
    def timeout(self) -> float: ...

    @property
    def batch_rows(self) -> int: ...

    @property
    def memory_limit(self) -> str: ...

    @property
    def source(self) -> Source: ...

    @property
    def pool(self) -> WorkerPool: ...


# duckdb names the part of itself that failed ("Binder Error: ..."): the rest is the SQL-level reason
_ENGINE_PREFIX = re.compile(r"^(?:Binder|Catalog|Conversion|Parser|Invalid Input|Out of Range|Type Mismatch|"
                            r"Not implemented|Constraint|Dependency|Invalid Type|Serialization) Error: ")


def engine_error_text(message: str) -> str:
    """duckdb's error in SQL terms: its first line, without the name of the engine's component."""
    first = message.strip().splitlines()[0] if message.strip() else message
    return _ENGINE_PREFIX.sub("", first).rstrip("!")


def stream_columns(storage: Storage, table: str, columns: frozenset[str] | None) -> list[str] | None:
    """The columns of ``table`` to stream for a query that uses ``columns`` (None: all of them)."""
    names = storage.arrow_schema(table).names
    if columns is not None:
        # a query using no column (count(*)) still needs rows: stream the first column only
        names = [n for n in names if n in columns] or names[:1]
    _refuse_case_twins(storage, table, names)
    return names if columns is not None else None


def _refuse_case_twins(storage: Storage, table: str, names: list[str]) -> None:
    """duckdb resolves names without regard to case, so a table whose columns differ only in case
    (``FullName`` and ``fullname``, possible under dlt's case-sensitive naming conventions on PostgreSQL,
    SQLite, Delta...) cannot be queried with both: duckdb would rename one (``fullname_1``) or read
    the other. Such a query is refused; the table's read serves both under their stored names."""
    seen: dict[str, str] = {}
    for name in names:
        twin = seen.setdefault(name.lower(), name)
        if twin != name:
            raise InvalidRequest(
                f"columns '{twin}' and '{name}' of table '{table}' differ only in letter case, which the SQL "
                f"engine (duckdb) cannot tell apart; select the other columns by name, or read the table "
                f"itself (it serves both)", dataset=storage.dataset.name, table=table)


def idle_limit(timeout: float) -> float:
    """How long a query's result may go unread before the query is ended (sandbox and warehouse alike)."""
    return min(SQL_IDLE_SECONDS, timeout / 2)


class Job:
    """One query on one worker: its deadline, its caller's cancellation, the table data it asks for."""

    def __init__(self, sandbox: JobSettings, storage: Storage, query: CheckedQuery, op: str,
                 cancelled: Callable[[], bool] | None, parameters: pa.Table | None = None,
                 partition: TablePartition | None = None, user: str | None = None) -> None:
        self.sandbox, self.storage, self.query, self.op = sandbox, storage, query, op
        self.parameters = parameters
        self.partition = partition
        self.cancelled = cancelled
        self.idle_limit = idle_limit(sandbox.timeout)
        self.last_read = time.monotonic()  # when the caller last asked for a batch (see _watch)
        self.lock = threading.Lock()
        self.waiting = False  # the caller's thread is blocked on the worker (only then is its context polled)
        self.outcome: str | None = None  # "timeout" | "cancelled": why the server ended the worker
        self.source_error: BaseException | None = None
        self.done = False
        self.tables = sorted(query.tables.items())
        self.columns = [stream_columns(storage, t, c) for t, c in self.tables]
        self.pool = sandbox.pool
        # waiting for a worker is bounded by the same number of seconds, but is not the query's time: a query
        # that waited (others' queries held the workers) is refused "busy", never "exceeded the time limit"
        self.worker = self.pool.acquire(user or "", sandbox.timeout, cancelled, query.dataset)
        self.deadline = time.monotonic() + sandbox.timeout  # the query's own time starts with its worker
        self.last_read = time.monotonic()
        self.worker.job = self
        try:
            self.reader = self._send()
        except BaseException:
            self.finish(clean=False)
            raise

    def _send(self) -> pa.RecordBatchReader:
        schemas = [base64.b64encode(self.storage.arrow_schema(t, cols).serialize().to_pybytes()).decode()
                   for (t, _), cols in zip(self.tables, self.columns, strict=True)]
        request = {"op": self.op, "sql": self.query.sql, "dataset": self.query.dataset,
                   "tables": [[t, s] for (t, _), s in zip(self.tables, schemas, strict=True)],
                   "max_rows": self.sandbox.max_rows, "batch_rows": self.sandbox.batch_rows}
        if self.parameters is not None:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, self.parameters.schema) as writer:
                writer.write_table(self.parameters)
            request["parameters"] = base64.b64encode(sink.getvalue().to_pybytes()).decode()
        r, w = pipe()
        try:
            send_frame(self.worker.sock, request, [w])
        except OSError:
            os.close(r)
            raise
        finally:
            os.close(w)
        self.result = os.fdopen(r, "rb")
        threading.Thread(target=self._watch, daemon=True).start()
        return self.wait(lambda: pa.ipc.open_stream(pa.PythonFile(self.result, mode="r")))

    def _watch(self) -> None:
        """Ends the worker at the deadline, when the caller cancels while it waits for the worker, or when
        the caller stops reading the result (issue 22: four half-read streams held every worker for as long
        as their client liked). A worker ended while its caller is away is given back to the pool at once -
        the slot is free for others - and the caller's next read gets the reason."""
        while True:
            time.sleep(_POLL_SECONDS)
            with self.lock:
                if self.done:
                    return
                now = time.monotonic()
                if now >= self.deadline:
                    self.outcome = "timeout"
                elif self.waiting and self.cancelled is not None and self.cancelled():
                    # polled only while the caller's thread is blocked in wait(): its call is still on
                    self.outcome = "cancelled"
                elif not self.waiting and now - self.last_read >= self.idle_limit:
                    self.outcome = "idle"
                if self.outcome:
                    self.worker.kill()
                    away = not self.waiting
                    break
        if away:  # nobody is reading: free the slot now (finish() is idempotent)
            self.finish(clean=False)

    def wait(self, step: Callable[[], Any]) -> Any:
        """Run a blocking read from the worker with the caller's cancellation watched."""
        with self.lock:
            if self.done and self.outcome is not None:  # ended (and given back) while the caller was away
                raise self._ended()
            self.waiting = True
        try:
            return step()
        except (pa.ArrowException, OSError, ValueError):
            raise self._ended() from None
        finally:
            with self.lock:
                self.waiting = False
                self.last_read = time.monotonic()

    def next_batch(self) -> pa.RecordBatch | None:
        """The next result batch; None at the end; the query's error if it failed."""
        try:
            batch, metadata = self.wait(self.reader.read_next_batch_with_custom_metadata)
        except StopIteration:
            raise self._ended() from None
        if metadata is not None and metadata.get(MARK.encode()) is not None:
            if metadata.get(MARK.encode()) == END.encode():
                return None
            raise self._error(metadata.get(b"kind", b"").decode(), metadata.get(b"message", b"").decode())
        return batch

    def _ended(self) -> BaseException:
        """Why the result stream stopped without its end mark: the server ended the worker, or it died."""
        self.worker.kill()
        self.worker.proc.wait()
        timeout = self.sandbox.timeout
        if self.outcome == "timeout":
            return SqlLimitExceeded.time_limit(timeout, self.query.dataset)
        if self.outcome == "cancelled":
            return Cancelled("the query was cancelled by its caller", dataset=self.query.dataset)
        if self.outcome == "idle":
            return SqlLimitExceeded.idle_result(self.idle_limit, self.query.dataset)
        if self.source_error is not None:
            return self.source_error
        # killed by the kernel (the memory limit) or crashed under it
        return SqlLimitExceeded(f"{_MEMORY_TEXT} (the query's sandbox process ended with "
                                f"{exit_text(self.worker.proc.returncode)})", dataset=self.query.dataset,
                                limit="server.sql_memory_limit", value=self.sandbox.memory_limit)

    def _error(self, kind: str, message: str) -> BaseException:
        if self.source_error is not None:
            return self.source_error
        dataset = self.query.dataset
        if kind == "memory":
            return SqlLimitExceeded(_MEMORY_TEXT, dataset=dataset, limit="server.sql_memory_limit",
                                    value=self.sandbox.memory_limit)
        if kind == "interrupt":
            return SqlLimitExceeded.time_limit(self.sandbox.timeout, dataset)
        if kind == "permission":
            return InvalidRequest("query tried to reach outside the dataset (files, network or settings)", dataset=dataset)
        if kind == "rows":
            return SqlLimitExceeded(message, dataset=dataset, limit="server.sql_max_rows", value=self.sandbox.max_rows)
        if kind == "refused":
            return InvalidRequest(message, dataset=dataset)
        if kind in ("sql", "source"):
            return InvalidRequest(f"SQL error: {engine_error_text(mask(message))[:500]}", dataset=dataset)
        log.error("SQL sandbox worker failed: %s", mask(message))
        return Unavailable("the SQL sandbox failed; see the server log", dataset=dataset)

    def feed(self, index: int, fd: int) -> None:
        """Stream table ``index`` (projected) into the pipe the worker sent; ends when the worker stops reading."""
        sink = os.fdopen(fd, "wb")
        reader = None
        try:
            table, _ = self.tables[index]
            pushed = self.query.pushdown
            args = (self.storage, table, self.columns[index], pushed.limits.get(table), pushed.filters.get(table))
            if self.partition is not None and self.partition.table == table:
                # only then: a source written for five arguments keeps working for whole tables
                reader = self.sandbox.source(*args, partition=self.partition.spec)
            else:
                reader = self.sandbox.source(*args)
            with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
        except (BrokenPipeError, ConnectionError):
            pass  # the worker finished with the table early (a LIMIT) or was ended
        except (IndexError, ValueError):
            pass
        except BaseException as exc:  # noqa: BLE001 - reported as the query's error
            if not self.worker.dead and not isinstance(exc, (OSError, pa.ArrowException)):
                self.source_error = exc
        finally:
            if reader is not None:
                try:
                    reader.close()
                except Exception:  # noqa: BLE001
                    pass
            try:
                sink.close()
            except OSError:
                pass

    def finish(self, clean: bool) -> None:
        """Give the worker back (a cleanly ended query) or end it (anything else)."""
        with self.lock:
            if self.done:
                return
            self.done = True
        result = getattr(self, "result", None)
        if result is not None:
            try:
                result.close()
            except OSError:
                pass
        self.pool.release(self.worker, reuse=clean and self.outcome is None)
