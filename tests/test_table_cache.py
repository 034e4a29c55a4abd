"""The hot-table cache: its byte budget holds while a table is read, not only after (in process); a cached
table follows the owner's loads (a real server over duckdb and Delta)."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import dlt
import pyarrow as pa
import pytest

from client import InvalidRequestError, connect
from flight_server.domain.table_cache import TableCache
from flight_server.storage.duckdb import RACY_NS
from flight_server.testing.servers import ServerProcess, wait_until
from tests.test_pushdown import destination_named_nums


class Lumpy:
    """A storage whose sample looks small but whose rows past the sample are 1 MB each; counts the
    batches a reader hands out."""

    def __init__(self, batches: int = 50) -> None:
        self.batches = batches
        self.pulled = 0
        self.dataset = SimpleNamespace(name="ds")

    def table_version(self, table: str) -> str:
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


@pytest.mark.slow  # a server process (the module's other tests run in process)
@pytest.mark.parametrize("kind", ["duckdb", "delta_local"])
def test_a_hot_table_follows_the_owners_loads(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A table cached after a few reads (SQL and table reads share it) is keyed by its version: the owner's
    own dlt pipeline appending, merging and adding a column while the server runs shows at the next query,
    right after the load as much as later (duckdb: the file's stamp; Delta: the table's commit version)."""
    destination, owner, _ = destination_named_nums(kind, tmp_path, request)
    (tmp_path / "dlt.yml").write_text(textwrap.dedent(f"""
        destinations:
          {destination}
        datasets:
          hot: {{destination: [nums]}}
        server: {{anonymous_profile: access}}
    """))
    pipeline = dlt.pipeline(f"hot_{kind}", destination=owner, dataset_name="hot", pipelines_dir=str(tmp_path / "pl"))

    def load(rows: list[dict], disposition: str = "append") -> None:
        resource = dlt.resource(rows, name="t", primary_key="id", write_disposition=disposition,
                                table_format="delta" if kind == "delta_local" else None)
        pipeline.run(resource).raise_on_failed_jobs()

    load([{"id": i, "v": i * 10} for i in range(1000)])
    with ServerProcess(tmp_path / "dlt.yml") as server, connect(server.url) as catalog:
        def answer() -> list[dict]:
            return catalog["hot"].sql("SELECT count(*) AS n, sum(v) AS total FROM t WHERE id >= 0").arrow().to_pylist()

        for _ in range(3):
            assert answer() == [{"n": 1000, "total": 4995000}]
        wait_until(lambda: "cached hot.t" in server.output(), "the table cached", timeout=60)
        assert answer() == [{"n": 1000, "total": 4995000}]  # from memory
        load([{"id": 1000, "v": 1}])
        assert answer() == [{"n": 1001, "total": 4995001}]
        if kind == "duckdb":  # as it is once the window in which a file's stamp is not trusted has passed
            age_past_the_racy_window(tmp_path / "nums.duckdb")
        assert answer() == [{"n": 1001, "total": 4995001}]
        load([{"id": 0, "v": 7, "extra": "new column"}], "merge")
        assert answer() == [{"n": 1001, "total": 4995008}]

        def new_column() -> list[dict] | None:
            try:
                return catalog["hot"].sql("SELECT extra FROM t WHERE id = 0").arrow().to_pylist()
            except InvalidRequestError:
                if kind == "duckdb":
                    raise  # a duckdb file's stamp tells at once
                return None  # Delta: the column shows once the stored schema is read again (its TTL)

        try:
            assert wait_until(new_column, "the new column", timeout=60) == [{"extra": "new column"}]
            assert catalog["hot"].t.row_count() == 1001
        except Exception:
            print(server.output()[-8000:])
            raise


def age_past_the_racy_window(database: Path) -> None:
    """Date a duckdb file (and its WAL) back past :data:`RACY_NS`, as if the last write were that long ago:
    the server then trusts the file's stamp (flight_server/storage/duckdb.py) without the test waiting."""
    assert database.exists(), database
    for path in (database, database.with_name(database.name + ".wal")):
        if path.exists():
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 2 * RACY_NS))
