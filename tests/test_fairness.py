"""Issue 22, "one caller can starve everyone": fair shares per user, against a real server process.

Two users, ann and ben (static API tokens), on the demo project. ann plays the greedy or careless
client: slow queries on every worker she can get, floods of 100,000-character queries, hundreds of
uploads that never send. Each test asserts what ben gets meanwhile (an answer) and what ann gets
beyond her share ("busy", UNAVAILABLE, never "exceeded the time limit" for time spent waiting).
Conditions are polled with deadlines (the server's ``health`` counters); no sleeps, no timings.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import adbc_driver_flightsql.dbapi as flight_sql
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import yaml

from client import connect
from client.errors import ServerUnavailableError
from client.protocol import WriteCommand, encode_command
from flight_server.domain.credentials import hash_token
from flight_server.domain.sql import ANALYSES_WAITING_PER_USER, SANDBOX_WORKERS
from flight_server.domain.writer import UPLOADS_WAITING_PER_USER
from flight_server.testing.queries import long_query
from flight_server.testing.servers import ServerProcess, make_project

EVENTS = "github_events_dataset"
REPORTS = "reports_dataset"
TOKENS = {"ann": "fst_ann-token-0123456789abcdef0123456789", "ben": "fst_ben-token-0123456789abcdef0123456789",
          "cid": "fst_cid-token-0123456789abcdef0123456789"}
TIMEOUT = 10  # server.sql_timeout
PER_USER = 2  # server.sql_per_user
UPLOADS_PER_USER = 4
IDLE_SECONDS = 5  # server.upload_idle_seconds
# runs until the time limit: 300^5 rows
SLOW = "SELECT count(*) AS n FROM push_event a, push_event b, push_event c, push_event d, push_event e"


def _project(folder: Path, **server: Any) -> Path:
    project = make_project(folder, events=300)
    config = yaml.safe_load(project.read_text())
    config["users"] = {name: {"profile": "access", "token_hash": hash_token(token)} for name, token in TOKENS.items()}
    config["server"].update(server)
    project.write_text(yaml.safe_dump(config))
    return project


@pytest.fixture(scope="module")
def fair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    project = _project(tmp_path_factory.mktemp("fair"), sql_timeout=TIMEOUT, sql_per_user=PER_USER,
                       uploads_per_user=UPLOADS_PER_USER, upload_idle_seconds=IDLE_SECONDS)
    with ServerProcess(project) as server:
        yield server
        assert server.alive, server.output()


def _options(user: str, timeout: float | None = None) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKENS[user]}".encode())], timeout=timeout)


def _sql(server: ServerProcess, user: str, query: str) -> pa.Table:
    with connect(server.url, token=TOKENS[user]) as catalog:
        return catalog[EVENTS].sql(query).arrow()


def _flight_sql(server: ServerProcess, user: str, query: str) -> list[Any]:
    with flight_sql.connect(server.url, db_kwargs={"username": user, "password": TOKENS[user]},
                            autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(query)
        return cur.fetchall()


def _health(server: ServerProcess) -> dict[str, Any]:
    with connect(server.url, token=TOKENS["ben"]) as catalog:
        return catalog.health()


def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds  # a bound against hanging, not a timing
    while not condition():
        assert time.monotonic() < deadline, f"not reached: {what}"
        time.sleep(0.05)


def _in_threads(count: int, work: Callable[[int], Any]) -> tuple[list[threading.Thread], list[Any]]:
    outcomes: list[Any] = []

    def run(i: int) -> None:
        try:
            outcomes.append(work(i))
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            outcomes.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads, outcomes


def _calls(server: ServerProcess, rpc: str) -> int:
    return int(_health(server)["calls"].get(rpc, 0))


def test_one_users_slow_queries_leave_workers_for_others(fair: ServerProcess) -> None:
    """Regression (issue 22): ann's four slow queries held every worker, and ben's ``SELECT 1`` failed after
    10 s with "query exceeded the time limit". ann holds at most her share; ben's query runs meanwhile."""
    before = _calls(fair, "do_get")
    threads, outcomes = _in_threads(SANDBOX_WORKERS, lambda _: _sql(fair, "ann", SLOW))
    _wait_for(lambda: _calls(fair, "do_get") >= before + PER_USER, "ann's queries reached the sandbox")
    assert _sql(fair, "ben", "SELECT 1 AS one").column("one").to_pylist() == [1]
    assert _flight_sql(fair, "ben", f"SELECT count(*) > 0 FROM {EVENTS}.push_event") == [(True,)]
    for thread in threads:
        thread.join(4 * TIMEOUT + 60)
    assert len(outcomes) == SANDBOX_WORKERS
    for outcome in outcomes:  # each ran its own time, or waited for a worker and was told so
        assert isinstance(outcome, Exception), outcome
        assert f"time limit of {TIMEOUT} s" in str(outcome) or "busy" in str(outcome), outcome


def test_greedy_users_leave_a_worker_for_a_newcomer(fair: ServerProcess) -> None:
    """Review of issue 22, F5: ann and ben at their share of 2 each took all 4 workers, and cid's ``SELECT 1``
    waited ~11 s for one of their slow queries to end. The last free worker is kept for a user who holds
    none: ann and ben wait for it rather than take it, and cid's query runs in it."""
    before = _calls(fair, "do_get")
    threads, outcomes = _in_threads(2 * SANDBOX_WORKERS, lambda i: _sql(fair, ("ann", "ben")[i % 2], SLOW))
    try:
        _wait_for(lambda: _calls(fair, "do_get") >= before + SANDBOX_WORKERS - 1, "their queries reached the sandbox")
        # one worker idle while they wait - at once, or, when the first of them came alone and borrowed a
        # worker beyond her share before the other arrived, as soon as that query ends (fair.py)
        _wait_for(lambda: (sql := _health(fair)["sql"])["running"] == SANDBOX_WORKERS - 1 and sql["waiting"] > 0,
                  "a worker kept free while they wait", seconds=4 * TIMEOUT + 60)
        assert _sql(fair, "cid", "SELECT 1 AS one").column("one").to_pylist() == [1]
    finally:
        for thread in threads:
            thread.join(8 * TIMEOUT + 60)
    for outcome in outcomes:
        assert f"time limit of {TIMEOUT} s" in str(outcome) or "busy" in str(outcome), outcome


def test_a_query_beyond_the_users_share_waits_and_is_told_busy(fair: ServerProcess) -> None:
    """ann alone uses the idle workers beyond her share but one, kept for a user who has none; her queries
    beyond that wait for one of her own to end - not for the time limit of the query that waits - and more
    than a few waiting are refused at once: UNAVAILABLE "busy", a retry may succeed."""
    before = _calls(fair, "do_get")
    held = SANDBOX_WORKERS - 1
    slow, slow_outcomes = _in_threads(held, lambda _: _sql(fair, "ann", SLOW))
    _wait_for(lambda: _calls(fair, "do_get") >= before + held, "ann's slow queries reached the sandbox")
    cheap, cheap_outcomes = _in_threads(12, lambda _: _sql(fair, "ann", "SELECT 1 AS one"))
    for thread in slow + cheap:
        thread.join(4 * TIMEOUT + 60)
    errors = [o for o in cheap_outcomes if isinstance(o, Exception)]
    answers = [o for o in cheap_outcomes if not isinstance(o, Exception)]
    assert errors, "ann's queries beyond her share and her queue were all accepted"
    for error in errors:
        assert isinstance(error, ServerUnavailableError), error  # UNAVAILABLE: a retry may succeed
        assert "busy" in str(error) and "time limit" not in str(error), error
    for answer in answers:
        assert answer.column("one").to_pylist() == [1]
    for outcome in slow_outcomes:
        assert f"time limit of {TIMEOUT} s" in str(outcome), outcome


def test_long_queries_of_one_user_leave_the_parser_to_others(fair: ServerProcess) -> None:
    """Regression (issue 22): ann's 100,000-character queries took the parser (two analyses at once, any
    user) and pushed ben's ``SELECT 1`` to seconds. ann analyses one query at a time and queues a dozen (a
    dashboard's burst); the rest are refused "busy" at once, and ben's query is analysed meanwhile."""
    before = _calls(fair, "get_flight_info")
    count = 1 + ANALYSES_WAITING_PER_USER + 3
    threads, outcomes = _in_threads(count, lambda i: _sql(fair, "ann", long_query(i)).num_rows)
    _wait_for(lambda: _calls(fair, "get_flight_info") >= before + count, "ann's long queries reached the server")
    assert _sql(fair, "ben", "SELECT 1 AS one").column("one").to_pylist() == [1]
    answered_before_ben = sum(1 for o in list(outcomes) if not isinstance(o, Exception))
    for thread in threads:
        thread.join(600)
    refused = [o for o in outcomes if isinstance(o, Exception)]
    answered = [o for o in outcomes if not isinstance(o, Exception)]
    # ben's query was analysed while ann's accepted ones still waited (round-robin), not after all of them
    assert answered_before_ben < len(answered), (answered_before_ben, len(answered), refused[:2])
    assert refused, "all of ann's concurrent long queries were accepted"
    for error in refused:
        assert isinstance(error, ServerUnavailableError) and "busy" in str(error), error
    assert all(o == 1 for o in answered)


def _stalled_puts(server: ServerProcess, user: str, count: int, per_connection: int = 10) -> list[Any]:
    """``count`` DoPuts that send their schema and then nothing, never committing; over several connections."""
    schema = pa.schema([("id", pa.int64())])
    descriptor = flight.FlightDescriptor.for_command(encode_command(WriteCommand(REPORTS, "stalled", commit_marker=True)))
    opened = []
    for start in range(0, count, per_connection):
        client = flight.connect(server.url)
        for _ in range(min(per_connection, count - start)):
            writer, reader = client.do_put(descriptor, schema, options=_options(user, timeout=120))
            opened.append((client, writer, reader))
    return opened


def test_stalled_uploads_do_not_hold_the_server(fair: ServerProcess) -> None:
    """Regression (issue 22): 300 DoPuts opened at once that never sent stalled everyone's ``list_flights``,
    and each held a thread and a folder for as long as its client stayed. ann may have a few uploads open;
    the rest are refused "busy" at once; ben lists and saves meanwhile; ann's open ones end when idle."""
    before = _calls(fair, "do_put")
    stalled = _stalled_puts(fair, "ann", 300)
    _wait_for(lambda: _calls(fair, "do_put") >= before + 300, "ann's uploads reached the server")
    client = flight.connect(fair.url)
    assert {f.descriptor.path[0].decode() for f in client.list_flights(options=_options("ben"))} >= {EVENTS}
    client.close()
    with connect(fair.url, token=TOKENS["ben"]) as catalog:
        assert catalog[REPORTS].save(pa.table({"id": [1, 2, 3]}), "ben_saved").rows == 3
    outcomes: list[Any] = []
    for _client, writer, reader in stalled:  # ann never sends; what did the server make of her uploads?
        try:
            reader.read()  # returns once the call has ended (its status comes with close)
            writer.close()
            outcomes.append("accepted")
        except flight.FlightError as exc:
            outcomes.append(exc)
    busy = [o for o in outcomes if isinstance(o, flight.FlightUnavailableError) and "busy" in str(o)]
    assert len(busy) >= 300 - UPLOADS_PER_USER - UPLOADS_WAITING_PER_USER, outcomes[:5]
    for outcome in outcomes:
        assert isinstance(outcome, flight.FlightError), outcome
        assert not isinstance(outcome, flight.FlightTimedOutError), outcome  # the server ended it, not our deadline
    _wait_for(lambda: _health(fair)["uploads"]["running"] == 0, "ann's idle uploads ended")
    for client in {id(c): c for c, _w, _r in stalled}.values():
        client.close()


def test_a_save_whose_source_stalls_is_told_why_it_ended(fair: ServerProcess) -> None:
    """A save whose own data source stops sending past ``server.upload_idle_seconds``: the server can only
    hang up on it (the status of a call the client does not read never arrives), and the client said
    "Stream removed (Socket closed)". It says which limit ended the upload, that nothing was saved, and
    that a retry with the same save id is stored once."""
    before = _calls(fair, "do_put")

    def stalling() -> Iterator[pa.RecordBatch]:
        yield pa.record_batch([pa.array([1, 2])], names=["id"])
        # the upload is open on the server; the source goes quiet until the server has ended it
        _wait_for(lambda: _calls(fair, "do_put") > before and _health(fair)["uploads"]["running"] == 0,
                  "the server ended the idle upload")
        yield pa.record_batch([pa.array([3])], names=["id"])

    reader = pa.RecordBatchReader.from_batches(pa.schema([("id", pa.int64())]), stalling())
    with connect(fair.url, token=TOKENS["ann"]) as catalog:
        with pytest.raises(ServerUnavailableError) as raised:
            catalog[REPORTS].save(reader, "stalled_source")
        assert "server.upload_idle_seconds" in str(raised.value) and "nothing was saved" in str(raised.value)
        assert "Socket closed" not in str(raised.value)
        save_id = raised.value.fields["save_id"]
        assert raised.value.fields["may_be_stored"] is False and f"save_id={save_id!r}" in str(raised.value)
        assert catalog[REPORTS].save(pa.table({"id": [1, 2, 3]}), "stalled_source", save_id=save_id).rows == 3
        assert catalog[REPORTS]["stalled_source"].arrow().column("id").to_pylist() == [1, 2, 3]


def test_a_save_id_is_each_callers_own(fair: ServerProcess) -> None:
    """Regression (review 22, F6): a save id was one per profile, so natural ids collided - ben's save and an
    anonymous caller's with the id ann had used ("daily-2026-12-06") were answered with ann's LoadInfo and
    nothing of them was stored. Each caller's id is its own; ann's retry still answers as her first save."""
    table, save_id = "daily_by_caller", "daily-2026-12-06"
    with connect(fair.url, token=TOKENS["ann"]) as ann, connect(fair.url, token=TOKENS["ben"]) as ben, \
            connect(fair.url) as anonymous:
        first = ann[REPORTS].save(pa.table({"who": ["ann"] * 3}), table, save_id=save_id)
        bens = ben[REPORTS].save(pa.table({"who": ["ben"] * 5}), table, save_id=save_id)
        anonymous_one = anonymous[REPORTS].save(pa.table({"who": ["anonymous"] * 2}), table, save_id=save_id)
        assert len({first.load_ids, bens.load_ids, anonymous_one.load_ids}) == 3
        assert (bens.rows, anonymous_one.rows) == (5, 2)
        assert ann[REPORTS].save(pa.table({"who": ["ann"] * 3}), table, save_id=save_id).load_ids == first.load_ids
        stored = ann[REPORTS].refresh()[table].arrow().column("who").to_pylist()
        assert sorted(stored) == ["ann"] * 3 + ["anonymous"] * 2 + ["ben"] * 5


def test_upload_folders_left_by_a_crash_are_removed_at_start(tmp_path: Path) -> None:
    """A server killed while an upload is open leaves the upload's folder under ``puts/``; the next start
    removes it (a replica still running on the same data folder keeps its own)."""
    project = _project(tmp_path / "crash", upload_idle_seconds=600)
    puts = project.parent / ".flight-share" / "puts"

    def saves() -> list[Path]:
        return sorted(puts.glob("**/save_*_pipeline-*")) if puts.exists() else []

    server = ServerProcess(project)
    try:
        client = flight.connect(server.url)
        descriptor = flight.FlightDescriptor.for_command(encode_command(WriteCommand(REPORTS, "crashed", commit_marker=True)))
        writer, _reader = client.do_put(descriptor, pa.schema([("id", pa.int64())]), options=_options("ann", timeout=300))
        writer.write_batch(pa.record_batch([pa.array([1, 2, 3])], names=["id"]))
        _wait_for(lambda: bool(saves()), "the upload's folder exists")
        left = saves()
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(30)
        assert all(p.exists() for p in left)
        client.close()
    finally:
        server.stop()
    with ServerProcess(project) as again:
        assert not any(p.exists() for p in left), left
        with connect(again.url, token=TOKENS["ben"]) as catalog:
            assert catalog[REPORTS].save(pa.table({"id": [7]}), "after_crash")
        assert saves() == []
