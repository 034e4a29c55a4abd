"""Issue 22, "one caller can starve everyone": what another user gets while one user is greedy.

    .venv/bin/python benchmarks/fairness.py [--output benchmarks/results/fairness.json] [--seconds 20]

Starts the demo project (300 events, ``sql_timeout: 10`` as in the issue) as a real server process with
two users, ann and ben (static tokens). Phases, each ``--seconds`` long while ben measures:

1. ``idle``: ben's ``SELECT 1`` (GetFlightInfo + DoGet on one connection) with nothing else running;
2. ``slow_queries``: ann runs 4 queries that run until the time limit, again and again;
   ``two_greedy_users``: ann and dan each run 4 such queries;
3. ``long_queries``: ann sends 100,000-character queries from 8 threads, again and again;
4. ``stalled_uploads``: ann opens 300 DoPuts that send their schema and then nothing; ben's
   ``list_flights`` is measured instead;
5. ``half_read``: ann opens 4 SQL result streams, reads one batch of each and stops reading;
6. ``login_flood``: 96 threads send wrong passwords for carl (a password user) as fast as they can;
   ``name_spray``: 40 threads send Handshake logins for made-up user names; cara's correct login is measured,
   with the Python client and over the Handshake;
   ``dashboard_burst``: ben sends 10 cheap queries at once, 5 times, on an otherwise idle server;
7. ``concurrent_saves``: 4 clients save 200 rows into one dataset 3 times each, at once; ben's
   ``SELECT 1`` meanwhile, and each save's latency and outcome.

Per phase: ben's latencies (median, p99, max) and errors, and the errors ann got; over the run the
server's peak RSS (the server process; its SQL workers separately) and peak thread count. Figures
are for comparing runs on the same machine (before/after a change), not absolute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.flight as flight
import yaml

from client import connect
from client.protocol import SqlCommand, WriteCommand, encode_command
from flight_server.domain.credentials import hash_password, hash_token
from flight_server.testing.queries import long_query
from flight_server.testing.servers import ServerProcess, make_project

EVENTS = "github_events_dataset"
TOKENS = {"ann": "fst_ann-token-0123456789abcdef0123456789", "ben": "fst_ben-token-0123456789abcdef0123456789",
          "dan": "fst_dan-token-0123456789abcdef0123456789"}
SLOW = "SELECT count(*) AS n FROM push_event a, push_event b, push_event c, push_event d, push_event e"


def options(user: str, timeout: float | None = None) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKENS[user]}".encode())], timeout=timeout)


class Peaks:
    """Samples the server's RSS (process and SQL workers) and thread count every 0.1 s."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.rss = self.workers_rss = self.threads = 0
        self.stop = threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.rss = max(self.rss, self.process.memory_info().rss)
                self.threads = max(self.threads, self.process.num_threads())
                self.workers_rss = max(self.workers_rss, sum(c.memory_info().rss for c in self.process.children()))
            except psutil.Error:
                pass
            self.stop.wait(0.1)


def measure(seconds: float, probe: Callable[[], Any]) -> dict[str, Any]:
    latencies, errors = [], []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            probe()
            latencies.append(time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - counted
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            latencies.append(time.perf_counter() - started)
    latencies.sort()
    return {"n": len(latencies), "median_s": round(statistics.median(latencies), 4),
            "p99_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 4),
            "max_s": round(latencies[-1], 4), "errors": len(errors), "error_samples": sorted(set(errors))[:3]}


def greedy(url: str, threads: int, work: Callable[[Any, int], Any], stop: threading.Event,
           users: tuple[str, ...] = ("ann",)) -> tuple[list[threading.Thread], list[str]]:
    """ann's load (or ``users``' in turn): ``threads`` threads, each on its own connection, calling ``work``
    until ``stop``."""
    errors: list[str] = []

    def run(i: int) -> None:
        with connect(url, token=TOKENS[users[i % len(users)]]) as catalog:
            while not stop.is_set():
                try:
                    work(catalog, i)
                except Exception as exc:  # noqa: BLE001 - counted
                    errors.append(str(exc).splitlines()[0][:160])

    pool = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    return pool, errors


def summary(errors: list[str]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for e in errors:
        key = "busy" if "busy" in e else "time limit" if "time limit" in e else e[:80]
        kinds[key] = kinds.get(key, 0) + 1
    return kinds


def half_read(server: ServerProcess, seconds: float, probe: Callable[[], Any]) -> dict[str, Any]:
    """ann's 4 SQL streams, one batch read of each, then left unread while ben measures."""
    big = "SELECT a.id, b.id AS other, a.payload__ref FROM push_event a, push_event b"
    readers = []
    for _ in range(4):
        client = flight.connect(server.url)
        info = client.get_flight_info(flight.FlightDescriptor.for_command(
            encode_command(SqlCommand(EVENTS, big))),
            options=options("ann"))
        reader = client.do_get(info.endpoints[0].ticket, options=options("ann"))
        reader.read_chunk()
        readers.append((client, reader))
    result = measure(seconds, probe)
    outcomes = []
    for client, reader in readers:
        try:
            reader.read_all()
            outcomes.append("read whole")
        except flight.FlightError as exc:
            outcomes.append(str(exc).splitlines()[0][:100])
        client.close()
    result["ann_outcomes"] = summary(outcomes)
    return {"half_read": result}


def login_flood(server: ServerProcess, seconds: float, probe: Callable[[], Any]) -> dict[str, Any]:
    """96 threads of wrong passwords for carl while ben measures; then carl's right password."""
    stop = threading.Event()
    refused: list[str] = []

    def guess(i: int) -> None:
        client = flight.connect(server.url)
        while not stop.is_set():
            try:
                client.authenticate_basic_token("carl", f"wrong-{i}")
            except flight.FlightError as exc:
                refused.append(type(exc).__name__)
        client.close()

    pool = [threading.Thread(target=guess, args=(i,), daemon=True) for i in range(96)]
    for t in pool:
        t.start()
    result = measure(seconds, probe)
    stop.set()
    for t in pool:
        t.join(60)
    result["refused_guesses"] = len(refused)
    result["refusals"] = {k: refused.count(k) for k in set(refused)}
    return {"login_flood": result}


def name_spray(server: ServerProcess, seconds: float) -> dict[str, Any]:
    """40 threads of Handshake logins with made-up user names (no credential needed); cara's correct
    Handshake login is the probe (review of issue 22, F1: 1 of 10 got in). Not carl: the login flood
    before left his name throttled for a while, as it should."""
    stop = threading.Event()
    sprayed = [0]

    def spray(i: int) -> None:
        client = flight.connect(server.url)
        while not stop.is_set():
            try:
                client.authenticate_basic_token(f"nobody-{i}-{sprayed[0]}", "wrong")
            except flight.FlightError:
                pass
            sprayed[0] += 1
        client.close()

    pool = [threading.Thread(target=spray, args=(i,), daemon=True) for i in range(40)]
    for t in pool:
        t.start()
    def python_client() -> None:  # logs in with Basic on an ordinary call: its own source (its address)
        connect(server.url, username="cara", password="cara-secret-password").close()

    cara = flight.connect(server.url)
    result = measure(seconds / 2, python_client)
    # a Handshake client (ADBC) shares one source with every Handshake, the spray's included (docs/security.md)
    result["handshake"] = measure(seconds / 2, lambda: cara.authenticate_basic_token("cara", "cara-secret-password"))
    stop.set()
    for t in pool:
        t.join(60)
    cara.close()
    result["sprayed"] = sprayed[0]
    return {"name_spray": result}


def dashboard_burst(ben: Any, rounds: int = 5) -> dict[str, Any]:
    """ben's dashboard: 10 cheap queries at once on an otherwise idle server, ``rounds`` times (F5)."""
    refused, latencies = [], []

    def tile(i: int) -> None:
        started = time.perf_counter()
        try:
            ben[EVENTS].sql(f"SELECT {i} AS tile").arrow()
        except Exception as exc:  # noqa: BLE001 - counted
            refused.append(str(exc).splitlines()[0][:120])
        latencies.append(time.perf_counter() - started)

    for _ in range(rounds):
        pool = [threading.Thread(target=tile, args=(i,)) for i in range(10)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(120)
    latencies.sort()
    return {"dashboard_burst": {"queries": len(latencies), "refused": len(refused), "samples": sorted(set(refused))[:2],
                                "median_s": round(statistics.median(latencies), 4), "max_s": round(latencies[-1], 4)}}


def concurrent_saves(server: ServerProcess, probe: Callable[[], Any]) -> dict[str, Any]:
    """4 clients x 3 saves of 200 rows into reports_dataset at once; ben's SELECT 1 meanwhile."""
    latencies: list[float] = []
    errors: list[str] = []

    def saver(i: int) -> None:
        with connect(server.url, token=TOKENS["ann"]) as catalog:
            for n in range(3):
                started = time.perf_counter()
                try:
                    catalog["reports_dataset"].save(pa.table({"id": list(range(200)), "n": [n] * 200}), f"saves_{i}")
                except Exception as exc:  # noqa: BLE001 - counted
                    errors.append(str(exc).splitlines()[0][:160])
                latencies.append(time.perf_counter() - started)

    pool = [threading.Thread(target=saver, args=(i,), daemon=True) for i in range(4)]
    for t in pool:
        t.start()
    probes = []
    while any(t.is_alive() for t in pool):
        started = time.perf_counter()
        probe()
        probes.append(time.perf_counter() - started)
    latencies.sort()
    return {"concurrent_saves": {"saves": len(latencies), "errors": len(errors), "error_samples": sorted(set(errors))[:3],
                                 "save_median_s": round(statistics.median(latencies), 3),
                                 "save_max_s": round(latencies[-1], 3),
                                 "ben_select_1_max_s": round(max(probes), 4) if probes else None}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "p", events=300)
        config = yaml.safe_load(project.read_text())
        config["users"] = {n: {"profile": "access", "token_hash": hash_token(t)} for n, t in TOKENS.items()}
        config["users"]["carl"] = {"profile": "access", "password_hash": hash_password("carl-secret-password")}
        config["users"]["cara"] = {"profile": "access", "password_hash": hash_password("cara-secret-password")}
        config["server"].update(sql_timeout=10)
        project.write_text(yaml.safe_dump(config))
        with ServerProcess(project) as server:
            peaks = Peaks(server.proc.pid)
            ben = connect(server.url, token=TOKENS["ben"])
            select_one = lambda: ben[EVENTS].sql("SELECT 1 AS one").arrow()  # noqa: E731
            results["idle"] = measure(args.seconds / 2, select_one)

            for phase, threads, work, users in (
                ("slow_queries", 4, lambda catalog, i: catalog[EVENTS].sql(SLOW).arrow(), ("ann",)),
                ("two_greedy_users", 8, lambda catalog, i: catalog[EVENTS].sql(SLOW).arrow(), ("ann", "dan")),
                ("long_queries", 8, lambda catalog, i: catalog[EVENTS].sql(long_query(i)).arrow(), ("ann",)),
            ):
                stop = threading.Event()
                pool, errors = greedy(server.url, threads, work, stop, users)
                time.sleep(1.0)  # a benchmark: let ann's load build up
                results[phase] = measure(args.seconds, select_one)
                stop.set()
                for t in pool:
                    t.join(60)
                results[phase]["ann_errors"] = summary(errors)

            # 300 DoPuts that never send
            schema = pa.schema([("id", pa.int64())])
            descriptor = flight.FlightDescriptor.for_command(
                encode_command(WriteCommand("reports_dataset", "stalled", commit_marker=True)))
            opened, started = [], time.perf_counter()
            for _ in range(30):
                client = flight.connect(server.url)
                for _ in range(10):
                    writer, reader = client.do_put(descriptor, schema, options=options("ann", timeout=600))
                    opened.append((client, writer, reader))
            open_s = time.perf_counter() - started
            lister = flight.connect(server.url)
            results["stalled_uploads"] = measure(args.seconds, lambda: list(lister.list_flights(options=options("ben"))))
            results["stalled_uploads"]["open_300_s"] = round(open_s, 3)
            results["stalled_uploads"]["server_threads_peak"] = peaks.threads
            for client, _writer, _reader in opened:
                client.close()
            lister.close()
            results.update(half_read(server, args.seconds, select_one))
            results.update(login_flood(server, args.seconds, select_one))
            results.update(name_spray(server, args.seconds))
            results.update(dashboard_burst(ben))
            results.update(concurrent_saves(server, select_one))
            ben.close()
            peaks.stop.set()
            results["server_peak_rss_mb"] = round(peaks.rss / 2**20, 1)
            results["workers_peak_rss_mb"] = round(peaks.workers_rss / 2**20, 1)
            results["server_peak_threads"] = peaks.threads
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
