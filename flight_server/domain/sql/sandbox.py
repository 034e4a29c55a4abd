"""The sandbox: runs checked queries in warm, killable, memory-limited worker processes, within limits.

Limits: ``server.sql_max_rows`` (more rows fail the query), ``server.sql_timeout`` (each call: the bind of
GetFlightInfo / GetSchema; the run of DoGet to its last batch; counted from when the query has its worker)
and ``server.sql_memory_limit`` (per query; at most
:data:`~flight_server.domain.sql.workers.SANDBOX_WORKERS` queries run at once). A row-wise query may run
as one query per partition of its table (``run(..., partition=...)``): the limits hold per partition.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator

import pyarrow as pa

from flight_server.domain.config import ServerConfig, size_bytes
from flight_server.domain.errors import InvalidRequest, SqlLimitExceeded
from flight_server.domain.sql.check import CheckedQuery
from flight_server.domain.sql.jobs import Job, Source, stream_columns
from flight_server.domain.sql.rowwise import TablePartition
from flight_server.domain.sql.workers import SQL_PER_USER, shared_pool
from flight_server.domain.storage import Storage

#: result schemas remembered by SqlSandbox.schema (least recently used go first)
SCHEMA_MEMO_ENTRIES = 1024
SCHEMA_MEMO_MAX_FIELDS = 256  # wider results are bound again each time (the memo stays a few MB at most)


class SqlSandbox:
    """Runs checked queries in warm, killable, memory-limited worker processes (:mod:`.workers`, :mod:`.jobs`)."""

    def __init__(self, max_rows: int = 10_000_000, timeout: float = 120.0, memory_limit: str = "2GB",
                 batch_rows: int = 122_880, threads: int | None = None, source: Source | None = None,
                 per_user: int = SQL_PER_USER) -> None:
        self.max_rows = max_rows
        # where a query's tables come from: the adapter's reader, or the server's hot-table cache
        # (TableCache.sql_reader), with the columns the query uses and its pushed-down filters and limit
        self.source: Source = source or (lambda storage, table, columns, limit, where, partition=None:
                                         storage.reader(table, columns, limit, partition=partition, where=where))
        self.timeout = timeout
        self.batch_rows = batch_rows
        self.memory_limit = memory_limit
        self.memory_bytes = size_bytes(memory_limit)
        self.pool = shared_pool(self.memory_bytes, threads or 0, per_user)
        self._schemas: OrderedDict[bytes, pa.Schema] = OrderedDict()  # result schemas, see schema()
        self._schemas_lock = threading.Lock()

    @classmethod
    def from_config(cls, server: ServerConfig, source: Source | None = None) -> SqlSandbox:
        sandbox = cls(server.sql_max_rows, server.sql_timeout, server.sql_memory_limit, server.batch_rows,
                      source=source, per_user=server.sql_per_user or SQL_PER_USER)
        sandbox.pool.fill()  # warm before the first query
        return sandbox

    def close(self) -> None:
        self.pool.close()

    def stats(self) -> dict[str, int]:
        """Queries running and waiting in the sandbox (reported by ``health``)."""
        return self.pool.stats()

    def schema(self, storage: Storage, query: CheckedQuery, cancelled: Callable[[], bool] | None = None,
               parameters: pa.Table | None = None, *, user: str | None = None) -> pa.Schema:
        """The result schema, from binding the query in a worker (no table data is read).

        ``parameters``: bound values (:func:`check_parameters`); the first row is bound. A result schema
        without bound values depends only on the query and the Arrow schemas of what it reads, so it is
        remembered under those (a Flight SQL client asks twice per statement: CreatePreparedStatement,
        then GetFlightInfo); a table whose columns change is another key.
        """
        if parameters is not None:  # duckdb types a bound value by its value (1 INTEGER, 2**40 BIGINT): no memo
            return self._bind_schema(storage, query, cancelled, parameters, user)
        digest = hashlib.sha256()  # the key: a digest (a memo of 100,000-character queries would hold them all)
        for part in (query.sql, query.dataset):
            digest.update(part.encode() + b"\0")
        for t, c in sorted(query.tables.items()):
            digest.update(t.encode() + b"\0" + storage.arrow_schema(t, stream_columns(storage, t, c)).serialize().to_pybytes())
        key = digest.digest()
        with self._schemas_lock:
            known = self._schemas.get(key)
            if known is not None:
                self._schemas.move_to_end(key)
                return known
        schema = self._bind_schema(storage, query, cancelled, None, user)
        if len(schema) > SCHEMA_MEMO_MAX_FIELDS:
            return schema
        with self._schemas_lock:
            self._schemas[key] = schema
            while len(self._schemas) > SCHEMA_MEMO_ENTRIES:
                self._schemas.popitem(last=False)
        return schema

    def _bind_schema(self, storage: Storage, query: CheckedQuery, cancelled: Callable[[], bool] | None,
                     parameters: pa.Table | None, user: str | None = None) -> pa.Schema:
        job = Job(self, storage, query, "schema", cancelled, parameters, user=user)
        clean = False
        try:
            schema = job.reader.schema
            while job.next_batch() is not None:
                pass
            clean = True
        finally:
            job.finish(clean)
        return schema

    def run(self, storage: Storage, query: CheckedQuery,
            cancelled: Callable[[], bool] | None = None, parameters: pa.Table | None = None, *,
            partition: TablePartition | None = None, user: str | None = None) -> pa.RecordBatchReader:
        """A streaming reader of the result; the limits hold while it binds, runs and is read.

        ``user``: the caller, whose fair share of the workers the query takes (``server.sql_per_user``).

        ``cancelled``: the caller's ``context.is_cancelled``; polled only while the caller waits for
        the worker (so never after its call ended). ``parameters``: bound values, one row per
        execution (:func:`check_parameters`); the results of all rows, in row order, make one result.
        ``partition``: run a row-wise query (:func:`row_wise_table`) over one partition of its table
        only. Each partition is a query of its own: ``server.sql_timeout``, ``sql_memory_limit`` and
        ``sql_max_rows`` hold per partition.
        """
        if partition is not None and partition.table not in query.tables:
            raise InvalidRequest(f"a partition of table '{partition.table}' does not belong to this query",
                                 dataset=query.dataset)
        job = Job(self, storage, query, "run", cancelled, parameters, partition, user)
        try:
            # the first batch (or the error of a query that fails to bind) before the stream starts:
            # an error then leaves as the call's status, not in the middle of a stream
            first = job.next_batch()
        except BaseException:
            job.finish(False)
            raise
        return pa.RecordBatchReader.from_batches(job.reader.schema, self._limited(job, first))

    def _limited(self, job: Job, first: pa.RecordBatch | None) -> Iterator[pa.RecordBatch]:
        rows = 0
        clean = False
        batch = first
        try:
            while True:
                if batch is None:
                    clean = True
                    return
                rows += batch.num_rows
                if rows > self.max_rows:  # the worker stops first; this is the second wall
                    raise SqlLimitExceeded(
                        f"query result exceeds the limit of {self.max_rows:,} rows (server.sql_max_rows); "
                        "aggregate or add a LIMIT", dataset=job.query.dataset, limit="server.sql_max_rows",
                        value=self.max_rows)
                yield batch
                batch = job.next_batch()  # errors leave as raised; the transport maps them (audit.counted)
        finally:
            job.finish(clean)
