"""Hot tables kept as Arrow in server memory, so a repeated read is a memory stream.

duckdb's conversion of a table to Arrow costs more than sending it (see benchmarks/README.md): a
table read twice is therefore kept, within a byte budget (``server.cache_bytes``; 0 turns caching
off), as a ``pa.Table`` that Flight streams straight from memory in C++. Entries are keyed by the
destination's *version* of the table (``Storage.table_version``; for duckdb the dataset's: the stored
schema's hash and the newest dlt load id; for Delta the table's own version and the stored schema's hash), so a load — through this server or by dlt itself — makes the old entry unreachable; it is
dropped at the next lookup. Tables whose estimated Arrow size exceeds the budget are never
materialised: they keep streaming from the destination with flat server memory. The estimate is a
sample, so a fill also counts the bytes it has read batch by batch and gives up as soon as they pass
the budget (a fill never holds more than the budget plus the one batch that crossed it); a table that
did not fit is not tried again at that data version.

The cache only ever holds what a storage adapter's own reader produced, so a cached read returns
exactly the bytes an uncached one would.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from flight_server.domain.pushdown import Predicate, applicable, arrow_filter, dlt_types

log = logging.getLogger("flight_share.cache")

# the chunk layout Flight streams best from memory (measured in benchmarks/read_throughput.py)
CACHE_CHUNK_ROWS = 65_536


@dataclass
class _Entry:
    table: pa.Table
    nbytes: int


class TableCache:
    """An LRU of whole tables under a byte budget, filled in the background after a second read."""

    def __init__(self, budget_bytes: int, reads_before_caching: int = 2) -> None:
        self.budget = budget_bytes
        self.reads_before_caching = reads_before_caching
        self._entries: OrderedDict[tuple[Hashable, ...], _Entry] = OrderedDict()
        self._misses: dict[tuple[Hashable, ...], int] = {}
        self._filling: set[tuple[Hashable, ...]] = set()
        self._too_big: set[tuple[Hashable, ...]] = set()  # keys whose fill passed the budget
        self._lock = threading.Lock()
        self.used = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def table(self, storage: Any, command: Any, count: bool = True) -> pa.Table | None:
        """The cached rows of a read command, or None (the caller streams from the destination).

        ``count``: this lookup is a request for the table (GetFlightInfo), not the DoGet that follows it.
        """
        cached = self._whole(storage, command.table, count)
        if cached is None:
            return None
        if command.columns:
            cached = cached.select(list(command.columns))  # zero-copy
        if command.limit is not None:
            cached = cached.slice(0, command.limit)  # zero-copy
        return cached

    def sql_reader(self, storage: Any, table: str, columns: Sequence[str] | None, limit: int | None,
                   where: Sequence[Predicate] | None = None,
                   partition: dict[str, Any] | None = None) -> pa.RecordBatchReader:
        """A table as a SQL query reads it (the sandbox's source): from memory when it is cached - projected
        and filtered by the pushed-down predicates as the adapter's own reader would - else the adapter's
        reader. A SQL read counts toward caching like a table read.

        ``partition``: one of the adapter's partitions of the table (a Flight SQL endpoint of a split
        query): always the adapter's reader of that slice, and not counted (the cache holds whole tables)."""
        if partition is not None:
            return storage.reader(table, columns, limit, partition=partition, where=where)
        cached = self._whole(storage, table, count=True)
        if cached is None:
            return storage.reader(table, columns, limit, where=where)
        names = storage.arrow_schema(table, columns).names
        # floats=False: Arrow compares NaN unlike duckdb (for which NaN is the largest value): the sandbox does
        kept, complete = applicable(where, cached.schema, dlt_types(storage.table_columns(table)), floats=False)
        if not complete:
            limit = None  # a row limit holds only over the query's full filter
        scanner = pads.dataset(cached).scanner(columns=names, filter=arrow_filter(kept))
        if limit is not None:
            return scanner.head(int(limit)).to_reader()
        return scanner.to_reader()

    def _whole(self, storage: Any, table: str, count: bool) -> pa.Table | None:
        """The cached table at the storage's current data version, or None (maybe starting a fill)."""
        if not self.enabled:
            return None
        version = storage.table_version(table)
        if version is None:
            return None
        key = (storage.dataset.name, table, version)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            else:
                self._forget_older(key)
                if count:
                    self._misses[key] = self._misses.get(key, 0) + 1
                start_fill = (self._misses.get(key, 0) >= self.reads_before_caching and key not in self._filling
                              and key not in self._too_big)
                if start_fill:
                    self._filling.add(key)
        if entry is None:
            if start_fill:
                threading.Thread(target=self._fill, args=(storage, table, key), name="table-cache-fill",
                                 daemon=True).start()
            return None
        return entry.table

    def _forget_older(self, key: tuple[Hashable, ...]) -> None:
        """Drop entries of the same table at another data version (they can never be hit again)."""
        for other in [k for k in self._entries if k[:2] == key[:2] and k != key]:
            self.used -= self._entries.pop(other).nbytes
        for other in [k for k in self._misses if k[:2] == key[:2] and k != key]:
            del self._misses[other]
        self._too_big = {k for k in self._too_big if k[:2] != key[:2] or k == key}

    def _read_within_budget(self, storage: Any, table: str) -> pa.Table | None:
        """The table's rows, or None as soon as the batches read so far pass the budget."""
        reader = storage.reader(table, None, None)
        batches: list[pa.RecordBatch] = []
        nbytes = 0
        try:
            for batch in reader:
                nbytes += batch.nbytes
                if nbytes > self.budget:
                    return None
                batches.append(batch)
        finally:
            close = getattr(reader, "close", None)
            if close is not None:
                close()  # stop the destination's scan now, not when the reader is collected
        data = pa.Table.from_batches(batches, reader.schema)
        return pa.Table.from_batches(data.to_batches(max_chunksize=CACHE_CHUNK_ROWS), data.schema)

    def _fill(self, storage: Any, table: str, key: tuple[Hashable, ...]) -> None:
        try:
            estimate = storage.estimated_arrow_bytes(table)
            if estimate is None or estimate > self.budget:
                log.info("not caching %s.%s: estimated %s bytes, budget %s", key[0], table, estimate, self.budget)
                return
            data = self._read_within_budget(storage, table)
            if data is None:
                log.info("not caching %s.%s: larger than the budget of %s bytes", key[0], table, self.budget)
                with self._lock:
                    self._too_big.add(key)
                return
            nbytes = data.nbytes
            with self._lock:
                if nbytes > self.budget or storage.table_version(table) != key[2]:
                    return
                while self.used + nbytes > self.budget and self._entries:
                    _, evicted = self._entries.popitem(last=False)
                    self.used -= evicted.nbytes
                self._entries[key] = _Entry(data, nbytes)
                self.used += nbytes
            log.info("cached %s.%s: %d rows, %d bytes (%d of %d used)", key[0], table, data.num_rows, nbytes,
                     self.used, self.budget)
        except Exception:  # noqa: BLE001 - a failed fill only means the next read streams again
            log.warning("caching %s.%s failed", key[0], table, exc_info=True)
        finally:
            with self._lock:
                self._filling.discard(key)

    def evict(self, dataset: str) -> None:
        """Forget a dataset's tables (after this server wrote to it)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == dataset]:
                self.used -= self._entries.pop(key).nbytes
            for key in [k for k in self._misses if k[0] == dataset]:
                del self._misses[key]
            self._too_big = {k for k in self._too_big if k[0] != dataset}
