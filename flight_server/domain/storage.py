"""The one interface every destination adapter implements: the domain's port to its storage.

The domain owns it (and the value types it speaks: :class:`StoredSchema`, :class:`Partition`); the adapters in
``flight_server/storage/`` implement it and import only the domain; the one place that builds a server (the
CLI's ``serve``, the test fixtures) picks the adapters by destination kind (``flight_server.storage.open_storage``)
and hands that choice to the :class:`~flight_server.domain.catalog.Catalog`.

An adapter knows one dataset on one destination: its stored dlt schema, the Arrow schema of each
table, cheap row counts, and Arrow C++ readers that the Flight service hands straight to
``RecordBatchStream`` (no Python on the hot path). Writes go through dlt pipelines, so an adapter
also provides the dlt destination to load into.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from dlt.common.libs.pyarrow import columns_to_arrow
from dlt.common.schema import Schema
from dlt.common.schema.utils import has_table_seen_data, is_complete_column

from flight_server.domain.config import DatasetConfig, DestinationConfig
from flight_server.domain.errors import InvalidRequest, NotFound
from flight_server.domain.identifiers import quote
from flight_server.domain.lifetime import isolated
from flight_server.domain.pushdown import Predicate


@dataclass(frozen=True)
class Partition:
    """One independently readable slice of a table: ``spec`` goes into the ticket (JSON), ``records``
    is its row count (exact, or estimated where the destination only knows sizes)."""

    spec: dict[str, Any]
    records: int


def split_evenly(total: int, target: int, limit: int | None = None) -> int:
    """How many slices of about ``target`` rows ``total`` rows make (at least 1, at most ``limit``)."""
    if total <= target:
        return 1
    n = -(-total // target)
    return max(1, min(n, limit)) if limit is not None else n


def contiguous_groups(sizes: Sequence[int], n: int) -> list[tuple[int, int]]:
    """Split a sequence of unit sizes into at most ``n`` contiguous ``[start, stop)`` index ranges of
    about equal total size: the k-th cut goes to the unit boundary nearest to k/n of the total
    (later than the previous cut). Fewer ranges come out when large units leave no boundary."""
    cumulative = list(itertools.accumulate(sizes))
    total = cumulative[-1] if cumulative else 0
    cuts = [0]
    for k in range(1, n):
        ideal = total * k / n
        candidates = range(cuts[-1] + 1, len(sizes))  # cut after unit i-1, i.e. before unit i
        if not candidates:
            break
        best = min(candidates, key=lambda i: (abs(cumulative[i - 1] - ideal), i))
        cuts.append(best)
    cuts.append(len(sizes))
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def select_sql(dataset: str, table: str, columns: Sequence[str], where: str | None = None,
               limit: int | None = None) -> str:
    """The one SELECT the SQL adapters stream a table read with; ``columns`` are SQL expressions
    (quoted names, or the adapter's casts)."""
    sql = f"SELECT {', '.join(columns)} FROM {quote(dataset)}.{quote(table)}"
    if where:
        sql += f" WHERE {where}"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return sql


def int_range(spec: Any, key: str) -> tuple[int, int | None]:
    """A ``[start, stop|null]`` pair of non-negative integers from a partition spec."""
    value = spec.get(key) if isinstance(spec, dict) else None
    ok = (isinstance(value, list) and len(value) == 2
          and all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in value)
          and value[0] is not None and (value[1] is None or value[1] >= value[0]))
    if not ok or value is None:
        raise InvalidRequest(f"ticket partition must be {{\"{key}\": [start, stop or null]}}, got {spec!r}")
    return value[0], value[1]


def not_null_hints(columns: dict[str, Any]) -> set[str]:
    """The columns dlt stored with ``nullable: false``."""
    return {name for name, column in columns.items() if column.get("nullable") is False}


def with_not_null(schema: pa.Schema, not_null: set[str]) -> pa.Schema:
    """``schema`` with exactly the fields named in ``not_null`` non-nullable."""
    return pa.schema([f.with_nullable(f.name not in not_null) for f in schema])


def plain_arrow(schema: pa.Schema) -> pa.Schema:
    """A schema without field metadata and with extension types as their storage type."""
    return pa.schema([pa.field(f.name, f.type.storage_type if isinstance(f.type, pa.BaseExtensionType) else f.type,
                               f.nullable) for f in schema])


def conform(reader: pa.RecordBatchReader, schema: pa.Schema) -> pa.RecordBatchReader:
    """A reader that streams exactly ``schema`` (GetFlightInfo's schema is DoGet's): Arrow's cast, in
    C++, which fails on a null in a non-nullable field instead of streaming it."""
    return reader if reader.schema.equals(schema, check_metadata=True) else reader.cast(schema)


@dataclass(frozen=True)
class StoredSchema:
    """A dlt schema as the destination last stored it."""

    schema: Schema
    version: int
    version_hash: str

    @classmethod
    def from_row(cls, version: int, version_hash: str, schema_json: str | dict[str, Any]) -> StoredSchema:
        body = json.loads(schema_json) if isinstance(schema_json, str) else schema_json
        return cls(Schema.from_dict(body), int(version), version_hash)


# dlt's replace on SQL destinations. Its default, ``truncate-and-insert``, empties the table and its
# child tables in a transaction of their own before the load: a load that then fails leaves them
# empty. ``insert-from-staging`` loads into the staging dataset (``<dataset>_staging``) first, then
# runs TRUNCATE + INSERT ... SELECT for the table and its child tables as one SQL job (merge: DELETE
# of the matching rows + INSERT). dlt runs such a job in one transaction only when the destination's
# capabilities say ``supports_transactions`` (``SqlLoadJob.maybe_transaction``), and duckdb's and
# PostgreSQL's leave it unset: the TRUNCATE or DELETE was committed on its own, and an INSERT that then
# failed (malformed JSON for a json column, found by review) left the table emptied. Both engines do
# run the job in a transaction (DDL included), so the save destinations say so
# (:data:`SQL_SAVE_SETTINGS`): a replace or merge is then all-or-nothing. Checked in dlt 1.31 and by
# tests/test_write_safety.py and test_destination_writes.py.
SQL_REPLACE_STRATEGY = "insert-from-staging"
SQL_SAVE_SETTINGS: dict[str, Any] = {"replace_strategy": SQL_REPLACE_STRATEGY, "supports_transactions": True}

LOADS_TABLE = "_dlt_loads"  # dlt's load history

RECENT_RELOAD = 0.1  # seconds, see Storage.stored_schemas
SHARED_SCHEMA_TTL = 2.0  # schema_ttl of destinations shared with other processes

# How long a save waits for the saves ahead of it to the same dataset (their load steps) before UNAVAILABLE
# ("busy, retry"); no request waits without bound, but saves queue: each load step takes seconds at most.
WRITE_LOCK_TIMEOUT = 120.0


class FifoLock:
    """A lock whose waiters get it in arrival order (``threading.Lock`` wakes an arbitrary one, so a save
    could wait behind saves that came after it): concurrent saves to one dataset load one after the other,
    each waiting only for those ahead of it. Take a :meth:`ticket`, :meth:`wait` for its turn (in slices, to
    watch the client), then :meth:`release`; a waiter that stops waiting calls :meth:`give_up`."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket that holds (or may take) the lock
        self._given_up: set[int] = set()

    def ticket(self) -> int:
        with self._cond:
            self._next += 1
            return self._next - 1

    def wait(self, ticket: int, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for ``ticket``'s turn; True when it holds the lock."""
        with self._cond:
            return self._cond.wait_for(lambda: self._serving == ticket, timeout)

    def give_up(self, ticket: int) -> None:
        """Leave the queue (the lock too, if the turn came meanwhile)."""
        with self._cond:
            self._given_up.add(ticket)
            self._advance()

    def release(self) -> None:
        with self._cond:
            self._given_up.add(self._serving)
            self._advance()

    def _advance(self) -> None:
        while self._serving in self._given_up:
            self._given_up.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()


def newest_schemas_sql(version_table: str) -> str:
    """The newest row of each dlt schema in a ``_dlt_version`` table (qualified name), newest first: a
    window function, which every SQL engine dlt loads into has (duckdb, PostgreSQL, SQLite 3.25+...)."""
    return ("SELECT version, version_hash, schema FROM (SELECT version, version_hash, schema, inserted_at, "
            "row_number() OVER (PARTITION BY schema_name ORDER BY inserted_at DESC, version DESC) AS newest "
            f"FROM {version_table}) versions WHERE newest = 1 ORDER BY inserted_at DESC")


def staging_dataset(dataset: str) -> str:
    """dlt's staging dataset of a dataset (``staging_dataset_name_layout``'s default, ``%s_staging``)."""
    return f"{dataset}_staging"


class Storage(ABC):
    """One dataset on one destination."""

    def __init__(self, dataset: DatasetConfig, destination: DestinationConfig) -> None:
        self.dataset = dataset
        self.destination_config = destination
        self._schemas: list[StoredSchema] = []
        self._schema_loaded = False
        self._schema_at = 0.0
        self._schema_stamp: Hashable | None = None
        self._schema_generation = 0  # bumped by invalidate(): a read that raced it is not cached
        self._capabilities: Any = None
        self._arrow_schemas: dict[tuple[Any, ...], pa.Schema] = {}  # see table_arrow_schema
        self._lock = threading.RLock()
        self.write_lock = FifoLock()  # one load step per dataset at a time, in arrival order

    # --- schema -----------------------------------------------------------------------------
    # A dataset may hold several dlt schemas (two sources loaded into one dataset): each keeps its own
    # versions in ``_dlt_version``, and dlt reaches each one (``dlt.dataset(..., schema=name)``). The
    # server serves them all: the newest version of every schema, newest schema first; a table belongs
    # to the newest schema that has it, and a save goes through that schema (a new table: the newest).
    @abstractmethod
    def _load_stored_schemas(self) -> list[StoredSchema]:
        """The newest stored version of each dlt schema of the dataset, newest first ([]: nothing loaded)."""

    # seconds a cached stored schema is trusted before it is read again; None: until invalidate().
    # Destinations that other processes write to (replicas, pipelines) set it, so a new table or
    # column loaded elsewhere shows up without a restart.
    schema_ttl: float | None = None

    # whether version_stamp() tells changes: then cached schemas are trusted while the stamp stays the same
    # (past schema_ttl), and read again whenever it is None (a change too recent to trust the stamp)
    stamps_versions = False

    def version_stamp(self) -> Hashable | None:
        """A cheap stamp (no query) that changes whenever the stored data may have changed; None when
        the adapter cannot tell (right now)."""
        return None

    def stored_schemas(self) -> list[StoredSchema]:
        """The cached stored schemas (newest first); :meth:`invalidate` after a write.

        The cache's lock is never held while the schemas are read from the destination: that read waits
        for the destination (a duckdb file inside a save's write window), and the save, inside that window,
        invalidates the cache - holding one while waiting for the other deadlocked concurrent saves (issue
        22). A read that raced an :meth:`invalidate` is returned to its caller but not cached."""
        stamp = self.version_stamp()  # taken before a load: a change during the load shows next time
        with self._lock:
            stale = self.schema_ttl is not None and time.monotonic() - self._schema_at > self.schema_ttl
            if self.stamps_versions:  # a stamp too recent to trust: read again, at most every RECENT_RELOAD s
                stale = stamp != self._schema_stamp if stamp is not None else \
                    time.monotonic() - self._schema_at > RECENT_RELOAD
            if self._schema_loaded and not stale:
                return self._schemas
            generation = self._schema_generation
        schemas = self._load_stored_schemas()  # no lock held (see above)
        with self._lock:
            if generation == self._schema_generation:
                self._schemas = schemas
                self._schema_loaded = True
                self._schema_at = time.monotonic()
                self._schema_stamp = stamp
        return schemas

    def stored_schema(self, table: str | None = None) -> StoredSchema | None:
        """The schema that holds ``table`` (the newest that has it), else the dataset's newest schema."""
        schemas = self.stored_schemas()
        if table is not None:
            for stored in schemas:
                if table in stored.schema.tables:
                    return stored
        return schemas[0] if schemas else None

    @abstractmethod
    def forget_schema_version(self, schema_name: str, version_hash: str) -> None:
        """Remove one stored schema version (the writer's clean-up after a load that failed once dlt
        had stored its new schema: the dataset goes back to the version before)."""

    def invalidate(self) -> None:
        """Forget cached schema (after this server wrote to the dataset)."""
        with self._lock:
            self._schema_loaded = False
            self._schema_generation += 1
            self._arrow_schemas.clear()

    def table_names(self) -> list[str]:
        """Data tables (no dlt internals) that hold data, in schema order, of every stored schema."""
        names: list[str] = []
        for stored in self.stored_schemas():
            names += [str(t["name"]) for t in stored.schema.data_tables(seen_data_only=True)
                      if has_table_seen_data(t) and t["name"] not in names]
        return names

    # dlt's load history (``_dlt_loads``): readable, never listed or written, where the adapter reads it
    # as a table (the SQL destinations; on a filesystem it is a folder of JSON files, not served yet)
    serves_load_history = False
    # whether saves are possible here at all, all-or-nothing (dlt's plain filesystem layout: no)
    accepts_saves = True

    def readable_tables(self) -> list[str]:
        """The data tables, and the load history where this adapter serves it (reads and SQL)."""
        names = self.table_names()
        stored = self.stored_schema(LOADS_TABLE)
        if self.serves_load_history and stored is not None and LOADS_TABLE in stored.schema.tables:
            names.append(LOADS_TABLE)
        return names

    def table_columns(self, table: str) -> dict[str, Any]:
        stored = self.stored_schema(table)
        if stored is None or table not in self.readable_tables():
            raise NotFound(
                f"Table '{table}' not found in dataset '{self.dataset.name}'; tables: {', '.join(self.table_names()) or '(none)'}",
                dataset=self.dataset.name,
                table=table,
            )
        columns = dict(stored.schema.get_table_columns(table))
        for other in self.schemas_holding(table)[1:]:  # one table, loaded by several schemas: all its columns
            for name, column in other.schema.get_table_columns(table).items():
                columns.setdefault(name, column)
        return {n: c for n, c in columns.items() if is_complete_column(c)}

    def schemas_holding(self, table: str) -> list[StoredSchema]:
        """The stored schemas that describe ``table``, newest first (two pipelines may load one table)."""
        return [s for s in self.stored_schemas() if table in s.schema.tables]

    def arrow_schema(self, table: str, columns: Sequence[str] | None = None) -> pa.Schema:
        """The Arrow schema a read of ``table`` (or of ``columns`` of it) streams; reads no table data."""
        all_columns = self.table_columns(table)
        if not columns:
            return self.table_arrow_schema(table)
        missing = [c for c in columns if c not in all_columns]
        if missing:
            raise NotFound(
                f"Column(s) {', '.join(missing)} not found in table '{table}' of dataset '{self.dataset.name}'; "
                f"columns: {', '.join(all_columns)}",
                dataset=self.dataset.name,
                table=table,
                column=missing[0],
            )
        full = self.table_arrow_schema(table)
        return pa.schema([full.field(c) for c in columns])

    def table_arrow_schema(self, table: str) -> pa.Schema:
        """:meth:`served_schema` of the whole table, remembered per version of the dlt schemas holding it
        (a destination changes a column's type only in a load that stores a new schema version)."""
        columns = self.table_columns(table)
        key = (table, tuple(s.version_hash for s in self.schemas_holding(table)), tuple(columns))
        with self._lock:
            known = self._arrow_schemas.get(key)
        if known is None:
            known = self.served_schema(table, columns)
            with self._lock:
                if len(self._arrow_schemas) > 512:
                    self._arrow_schemas.clear()
                self._arrow_schemas[key] = known
        return known

    def served_schema(self, table: str, columns: dict[str, Any]) -> pa.Schema:
        """The Arrow schema of what dlt's own ``dataset()`` reads of ``table`` on this destination
        (docs/type-mapping.md): by default dlt's mapping of the stored columns with the destination's
        capabilities, NOT NULL where :meth:`not_null_columns` says the destination holds no null."""
        return with_not_null(self.arrow_schema_for(columns), self.not_null_columns(table, columns))

    def arrow_schema_for(self, columns: dict[str, Any]) -> pa.Schema:
        """dlt's own mapping of its types to Arrow, with this destination's capabilities (all nullable)."""
        schema = columns_to_arrow(columns, self.cached_capabilities(), "UTC")
        return pa.schema([f.with_nullable(True) for f in schema])

    def not_null_columns(self, table: str, columns: dict[str, Any]) -> set[str]:
        """The columns dlt stored as ``nullable: false`` that cannot hold a null here. The default: all of
        them (dlt creates them ``NOT NULL``); a reader's final cast to the served schema fails rather
        than stream a null in such a column."""
        return not_null_hints(columns)

    # --- destination ------------------------------------------------------------------------
    def cached_capabilities(self) -> Any:
        """:meth:`capabilities`, resolved once: dlt resolves its config on every call (milliseconds,
        and it keeps the caller's frames alive — see :func:`lifetime.isolated`)."""
        with self._lock:
            if self._capabilities is None:
                self._capabilities = isolated(self.capabilities)
            return self._capabilities

    @abstractmethod
    def capabilities(self) -> Any:
        """dlt DestinationCapabilitiesContext of this destination."""

    @property
    def table_format(self) -> str | None:
        """The table format dlt resources written here need (e.g. ``delta``), or None."""
        return self.destination_config.table_format

    @abstractmethod
    def dlt_destination(self) -> Any:
        """A dlt destination (factory) that loads into this dataset's destination."""

    def writing(self, cancelled: Callable[[], bool] | None = None) -> contextlib.AbstractContextManager[Any]:
        """The destination held for one write's load step (duckdb: its read-write connection); most
        destinations need nothing held. ``cancelled``: the caller's, polled while it waits for the hold."""
        return contextlib.nullcontext()

    def savepoint(self, tables: Sequence[str]) -> Callable[[], None] | None:
        """Before a load that may change or create ``tables`` (the table and its child tables, also
        ones the load would create): a function that puts them back as they are now, for a load that
        fails half way - tables that existed keep (or get back) their rows, tables that did not exist
        are removed again (dlt creates a new table before it loads its rows, so a failed load left
        an empty table that the stored schema does not know). None: nothing to put back."""
        return None

    def physical_table(self, table: str) -> str | None:
        """The name of a table already at the destination that a new ``table`` would be (e.g. one made
        by hand or by dbt, which no dlt schema of the dataset describes); None: none, or unknown."""
        return None

    def clear_staging(self, tables: Sequence[str]) -> None:  # noqa: B027 - a hook: most adapters stage nothing
        """After a load, whatever its outcome: empty the tables of dlt's staging dataset that the load
        used (``insert-from-staging`` replace and merge leave the rows there). Best effort."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the data lives, secrets masked as ``***``."""

    # --- reading ----------------------------------------------------------------------------
    @abstractmethod
    def row_count(self, table: str) -> int:
        """Rows in a table (cheap on this destination), -1 if unknown."""

    @abstractmethod
    def reader(self, table: str, columns: Sequence[str] | None, limit: int | None,
               partition: Mapping[str, Any] | None = None,
               where: Sequence[Predicate] | None = None) -> pa.RecordBatchReader:
        """A streaming Arrow reader over a table, or over one of its :meth:`partitions`.

        ``where``: a SQL query's filters the adapter may apply to skip data (domain/pushdown.py): it
        applies those it can apply exactly and streams a superset of the matching rows."""

    def row_bytes(self, table: str, columns: Sequence[str] | None, sample_rows: int) -> float | None:
        """Arrow bytes per row of a projection, from its first ``sample_rows`` rows (None: no rows)."""
        sample = self.reader(table, columns, sample_rows).read_all()
        return sample.nbytes / sample.num_rows if sample.num_rows else None

    def data_version(self) -> Any:
        """A value that changes whenever the dataset's data may have changed (None: unknown, so
        nothing of it is cached in server memory; see :mod:`flight_server.domain.table_cache`)."""
        return None

    def table_version(self, table: str) -> Any:
        """A value that changes whenever ``table``'s data may have changed (None: unknown). The default:
        the dataset's :meth:`data_version`."""
        return self.data_version()

    def estimated_arrow_bytes(self, table: str) -> int | None:
        """About how many bytes the whole table takes as Arrow (None: unknown)."""
        rows = self.row_count(table)
        if rows <= 0:
            return 0 if rows == 0 else None
        per_row = self.row_bytes(table, None, min(rows, 10_000))
        return None if per_row is None else int(per_row * rows)

    def partitions(self, table: str, target_rows: int) -> list[Partition]:
        """The table as contiguous slices of about ``target_rows`` rows, in table order, each readable
        on its own (``reader(..., partition=p.spec)``). One slice (or none for an empty table) means
        "read it as one stream". The default: never split."""
        return [Partition({}, self.row_count(table))]

    def close(self) -> None:  # noqa: B027 - a hook: adapters without connections hold nothing to close
        """Release connections."""
