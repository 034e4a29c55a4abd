"""The hot-table cache, in process: its byte budget holds while a table is read, not only after."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pyarrow as pa

from flight_server.domain.table_cache import TableCache


class Lumpy:
    """A storage whose sample looks small but whose rows past the sample are 1 MB each; counts the
    batches a reader hands out."""

    def __init__(self, batches: int = 50) -> None:
        self.batches = batches
        self.pulled = 0
        self.dataset = SimpleNamespace(name="ds")

    def data_version(self) -> str:
        return "v1"

    def estimated_arrow_bytes(self, table: str) -> int:
        return 1000  # what a sample of short rows says

    def reader(self, table: str, columns, limit) -> pa.RecordBatchReader:
        schema = pa.schema([("v", pa.string())])

        def batches():
            for _ in range(self.batches):
                self.pulled += 1
                yield pa.record_batch([pa.array(["x" * (1 << 20)])], schema=schema)

        return pa.RecordBatchReader.from_batches(schema, batches())


def _read(cache: TableCache, storage: Lumpy) -> None:
    assert cache.table(storage, SimpleNamespace(table="t", columns=None, limit=None)) is None


def _wait_idle(cache: TableCache) -> None:
    deadline = time.monotonic() + 10
    while cache._filling and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not cache._filling


def test_a_fill_stops_once_its_batches_pass_the_budget_and_is_not_retried() -> None:
    cache = TableCache(budget_bytes=5 << 20)
    storage = Lumpy()
    _read(cache, storage)
    _read(cache, storage)  # the second read starts a fill
    _wait_idle(cache)
    crossed = storage.pulled
    assert 5 <= crossed <= 6  # the batch that crossed the 5 MiB budget was the last read: the other 44 never were
    assert cache.used == 0
    for _ in range(5):
        _read(cache, storage)
    _wait_idle(cache)
    assert storage.pulled == crossed  # the table did not fit at this data version: no fill per read


def test_a_table_within_the_budget_is_cached() -> None:
    cache = TableCache(budget_bytes=5 << 20)
    storage = Lumpy(batches=3)
    _read(cache, storage)
    _read(cache, storage)
    _wait_idle(cache)
    hit = cache.table(storage, SimpleNamespace(table="t", columns=None, limit=None))
    assert hit is not None and hit.num_rows == 3 and cache.used == hit.nbytes
