"""The duckdb file handle, in process: held only during requests, and no wait without bound."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import duckdb
import pytest

import flight_server.storage.duckdb as duckdb_storage
from flight_server.domain.errors import Unavailable


class _Waits(threading.Condition):
    """A FileHandle's condition that records the timeout of every wait on it (None: a wait without bound)."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        return super().wait(timeout)


def _recording_waits(handle: duckdb_storage.FileHandle) -> _Waits:
    handle._cond = _Waits()
    return handle._cond


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
    waits = _recording_waits(handle)
    cursor = handle.acquire_read()  # a stream its client never reads
    with pytest.raises(Unavailable, match="busy with reads; nothing was written"):
        with handle.writing():
            pass
    # the save gave up at its deadline: every wait it made was bounded by BUSY_TIMEOUT
    assert waits.timeouts and all(t is not None and t <= duckdb_storage.BUSY_TIMEOUT for t in waits.timeouts), waits.timeouts
    handle.release_read(cursor)

    inside, release = threading.Event(), threading.Event()

    def slow_save() -> None:
        with handle.writing():
            inside.set()
            release.wait(10)

    writer = threading.Thread(target=slow_save)
    writer.start()
    assert inside.wait(5)
    with handle.reading() as cursor:  # a read during a save does not wait for it (issue 22 §4)
        assert cursor.execute("SELECT 42").fetchone() == (42,)
    release.set()
    writer.join(10)


def _busy_readers(handle: duckdb_storage.FileHandle, stop: threading.Event, count: int) -> list[threading.Thread]:
    """``count`` threads that read the file back to back, overlapping, until ``stop``: the share never
    drops to zero by itself (review finding: 8 such readers kept the owner out for good)."""
    reading = threading.Barrier(count + 1)  # returned once every reader is inside its first read

    def loop() -> None:
        first = True
        while not stop.is_set():
            try:
                with handle.reading() as cursor:
                    cursor.execute("SELECT sum(a) FROM t").fetchone()
                    if first:
                        first = False
                        with contextlib.suppress(threading.BrokenBarrierError):
                            reading.wait(30)
                    time.sleep(0.05)  # a stream that takes a while (its length is the test's subject)
            except Unavailable:
                pass  # busy with a save: a reader retries

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    reading.wait(30)
    return threads


def test_the_owners_process_gets_the_file_while_readers_never_stop(tmp_path: Path) -> None:
    """Another process (the owner's pipeline, which fails fast on duckdb's lock and retries) gets the
    file within seconds, however many overlapping reads the server has."""
    import subprocess
    import sys

    path = str(tmp_path / "f.duckdb")
    with duckdb.connect(path) as con:
        con.execute("CREATE TABLE t AS SELECT range AS a FROM range(100000)")
    handle = duckdb_storage.FileHandle(path)
    stop = threading.Event()
    threads = _busy_readers(handle, stop, 8)  # returns once all 8 are reading
    try:
        owner = (
            "import duckdb, time, sys\n"
            "deadline = time.monotonic() + 15\n"
            "while True:\n"
            "    try:\n"
            f"        con = duckdb.connect({path!r})\n"
            "    except duckdb.Error as exc:\n"
            "        if 'lock' not in str(exc).lower() or time.monotonic() > deadline: raise\n"
            "        time.sleep(0.1)\n"
            "        continue\n"
            "    con.execute('INSERT INTO t VALUES (-1)')\n"
            "    con.close()\n"
            "    break\n"
        )
        done = subprocess.run([sys.executable, "-c", owner], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    with handle.reading() as cursor:
        assert cursor.execute("SELECT count(*) FROM t WHERE a = -1").fetchone() == (1,)


def test_a_save_gets_the_file_while_readers_never_stop(tmp_path: Path) -> None:
    """New reads wait while a save waits: the save is not starved by overlapping readers."""
    path = str(tmp_path / "f.duckdb")
    with duckdb.connect(path) as con:
        con.execute("CREATE TABLE t AS SELECT range AS a FROM range(1000)")
    handle = duckdb_storage.FileHandle(path)
    stop = threading.Event()
    threads = _busy_readers(handle, stop, 8)  # returns once all 8 are reading
    try:
        # a save starved past BUSY_TIMEOUT raises Unavailable ("busy with reads"): getting through is the proof
        with handle.writing() as con:
            con.execute("INSERT INTO t VALUES (-1)")
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    with handle.reading() as cursor:
        assert cursor.execute("SELECT count(*) FROM t WHERE a = -1").fetchone() == (1,)


def test_a_thread_that_holds_a_read_may_read_again_while_others_wait(tmp_path: Path) -> None:
    """Re-entrant reads: a thread with an open stream that asks for a second cursor is never made to
    wait for its own stream to end (that would stall it until BUSY_TIMEOUT)."""
    path = str(tmp_path / "f.duckdb")
    with duckdb.connect(path) as con:
        con.execute("CREATE TABLE t AS SELECT 1 AS a")
    handle = duckdb_storage.FileHandle(path)
    first = handle.acquire_read()
    handle._opened_at -= 60  # held for a long time: new readers from other threads may wait now
    waits = _recording_waits(handle)
    second = handle.acquire_read()
    assert waits.timeouts == []  # the second read never waited
    handle.release_read(second)
    handle.release_read(first)


def test_one_long_stream_does_not_make_other_reads_wait(tmp_path: Path) -> None:
    """A stream held for long (a big table, a slow client) keeps the file whatever we do: new reads
    share it and are not made to wait for a drain that cannot happen."""
    path = str(tmp_path / "f.duckdb")
    with duckdb.connect(path) as con:
        con.execute("CREATE TABLE t AS SELECT 1 AS a")
    handle = duckdb_storage.FileHandle(path)
    long_stream = handle.acquire_read()
    # the stream (and the file's connection) held past HOLD_SECONDS and DRAIN_SECONDS, as after a long wait
    aged = duckdb_storage.HOLD_SECONDS + duckdb_storage.DRAIN_SECONDS + 1.0
    handle._opened_at -= aged
    handle._holders = {key: (thread, taken - aged) for key, (thread, taken) in handle._holders.items()}
    waits = _recording_waits(handle)
    for _ in range(20):
        with handle.reading() as cursor:
            cursor.execute("SELECT 1").fetchone()
    assert waits.timeouts == []  # no read waited for a drain
    handle.release_read(long_stream)


def test_a_read_during_a_save_sees_the_last_committed_data_without_waiting(tmp_path: Path) -> None:
    """Regression (issue 22 §4): reads of a duckdb file waited for a save's write window and then got
    UNAVAILABLE "busy with a save". A read during a save reads the save's own duckdb instance: the rows
    committed before, none of the save's uncommitted ones; after the commit, all of them."""
    path = str(tmp_path / "f.duckdb")
    with duckdb.connect(path) as con:
        con.execute("CREATE TABLE t AS SELECT range AS a FROM range(1000)")
    handle = duckdb_storage.FileHandle(path)
    inside, commit, committed = threading.Event(), threading.Event(), threading.Event()

    def save() -> None:
        with handle.writing() as con:
            load = con.duplicate()  # what dlt does with a borrowed connection
            load.execute("BEGIN TRANSACTION")
            load.execute("INSERT INTO t SELECT -1 FROM range(500)")
            inside.set()
            commit.wait(30)
            load.execute("COMMIT")
            load.close()
            committed.set()
            commit.wait(30)

    writer = threading.Thread(target=save)
    writer.start()
    try:
        assert inside.wait(30)
        stream = handle.acquire_read()  # a stream that outlives the save
        with handle.reading() as cursor:
            assert cursor.execute("SELECT count(*) FROM t").fetchone() == (1000,)
        commit.set()
        assert committed.wait(30)
        with handle.reading() as cursor:
            assert cursor.execute("SELECT count(*) FROM t").fetchone() == (1500,)
    finally:
        commit.set()
        writer.join(30)
    assert stream.execute("SELECT count(*) FROM t").fetchone() == (1500,)
    handle.release_read(stream)
    other = duckdb.connect(path)  # all let go: the owner's pipeline may open the file
    other.close()


def test_saves_to_datasets_of_one_file_queue_for_the_window_in_arrival_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of issue 22, F10: while one dataset's long save held the file's write window, a save into
    another dataset of the same file waited BUSY_TIMEOUT and failed "the duckdb file /path/… is busy with
    reads". Saves wait for each other in arrival order (WRITE_LOCK_TIMEOUT, as saves to one dataset do);
    BUSY_TIMEOUT bounds only the wait for read-only reads. Errors name the destination, not the path."""
    monkeypatch.setattr(duckdb_storage, "BUSY_TIMEOUT", 0.0)  # a save waiting on a save must not use it
    path = str(tmp_path / "f.duckdb")
    handle = duckdb_storage.FileHandle(path, "warehouse")
    inside, release = threading.Event(), threading.Event()
    order: list[str] = []
    failures: list[BaseException] = []

    def save(name: str, hold: bool = False) -> None:
        try:
            with handle.writing() as con:
                con.execute(f"CREATE TABLE {name} AS SELECT 1 AS a")
                order.append(name)
                if hold:
                    inside.set()
                    release.wait(30)
        except BaseException as exc:  # noqa: BLE001 - the outcome under test
            failures.append(exc)

    threads = [threading.Thread(target=save, args=("first", True))]
    threads[0].start()
    assert inside.wait(10)
    for name in ("second", "third"):
        threads.append(threading.Thread(target=save, args=(name,)))
        threads[-1].start()
        deadline = time.monotonic() + 30  # a bound against hanging, not a timing
        while len(handle._write_queue) < len(threads) - 1:
            assert time.monotonic() < deadline and not failures, failures
            time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(30)
    assert not failures and order == ["first", "second", "third"], (failures, order)

    monkeypatch.setattr(duckdb_storage, "WRITE_LOCK_TIMEOUT", 0.0)
    inside.clear()
    release.clear()
    holder = threading.Thread(target=save, args=("fourth", True))
    holder.start()
    assert inside.wait(10)
    with pytest.raises(Unavailable, match="the duckdb file of destination 'warehouse' is busy with another save; "
                                          "nothing was written") as refused:
        with handle.writing():
            pass
    assert str(tmp_path) not in str(refused.value)
    release.set()
    holder.join(30)


def test_a_save_whose_client_left_while_it_waited_for_the_window_leaves_the_queue(tmp_path: Path) -> None:
    """Review of issue 22, R3: a save queued for the file's write window behind another dataset's save was
    written after its client had gone (and its answer then failed as INTERNAL). It now leaves the queue."""
    from flight_server.domain.errors import Cancelled

    handle = duckdb_storage.FileHandle(str(tmp_path / "f.duckdb"), "warehouse")
    inside, release, gone = threading.Event(), threading.Event(), threading.Event()
    outcome: list[BaseException | None] = []

    def holder() -> None:
        with handle.writing():
            inside.set()
            release.wait(30)

    def queued() -> None:
        try:
            with handle.writing(cancelled=gone.is_set) as con:
                con.execute("CREATE TABLE written AS SELECT 1 AS a")
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the outcome under test
            outcome.append(exc)

    first = threading.Thread(target=holder)
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=queued)
    second.start()
    deadline = time.monotonic() + 30  # a bound against hanging, not a timing
    while not handle._write_queue:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gone.set()
    second.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled), outcome
    assert "nothing was written" in str(outcome[0]) and not handle._write_queue
    release.set()
    first.join(30)
    with handle.reading() as cursor:
        assert cursor.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'written'").fetchone() == (0,)
