"""The duckdb file handle, in process: held only during requests, and no wait without bound."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import duckdb
import pytest

import flight_server.storage.duckdb as duckdb_storage
from flight_server.errors import Unavailable


def test_between_requests_another_process_may_open_the_file_read_write(tmp_path: Path) -> None:
    path = str(tmp_path / "f.duckdb")
    handle = duckdb_storage.FileHandle(path)
    with handle.writing() as con:
        con.execute("CREATE TABLE t AS SELECT 1 AS a")
    with handle.reading() as cursor:
        assert cursor.execute("SELECT count(*) FROM t").fetchone() == (1,)
    other = duckdb.connect(path)  # what the owner's pipeline does: possible, nothing is held
    other.close()


def test_an_idle_stream_never_stalls_a_save_and_a_save_never_stalls_reads_without_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(duckdb_storage, "BUSY_TIMEOUT", 0.5)
    path = str(tmp_path / "f.duckdb")
    duckdb.connect(path).close()
    handle = duckdb_storage.FileHandle(path)
    cursor = handle.acquire_read()  # a stream its client never reads
    started = time.monotonic()
    with pytest.raises(Unavailable, match="busy with reads; nothing was written"):
        with handle.writing():
            pass
    assert time.monotonic() - started < 5
    handle.release_read(cursor)

    inside, release = threading.Event(), threading.Event()

    def slow_save() -> None:
        with handle.writing():
            inside.set()
            release.wait(10)

    writer = threading.Thread(target=slow_save)
    writer.start()
    assert inside.wait(5)
    with pytest.raises(Unavailable, match="busy with a save; retry"):
        handle.acquire_read()
    release.set()
    writer.join(10)
    with handle.reading() as cursor:
        assert cursor.execute("SELECT 42").fetchone() == (42,)
