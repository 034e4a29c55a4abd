"""A mixed-load soak of one real server (issue 22): N clients for a while, each doing a mix of table reads,
SQL, appends to one shared table, refused writes (a frozen dataset) and refused SQL.

Printed at the end: calls and errors per kind (an *expected* refusal is not an error; any other failure
is), read and SQL latency p50/p99, the server's RSS at start, peak and end, and whether every acknowledged
append is in the table exactly once. Exit status 1 when anything unexpected happened.

    python benchmarks/soak.py --clients 16 --seconds 180
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client import InvalidRequestError, PipelineStepFailed, connect  # noqa: E402
from flight_server.testing.servers import REPO, ServerProcess, make_project  # noqa: E402

DATASET, FROZEN = "reports_dataset", "github_events_dataset"


def _rss_parts(pid: int) -> tuple[int, int]:
    """Resident bytes of the server process, and of its children (the SQL sandbox workers) together."""
    own = children = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().split()
            resident = int(stat[23]) * os.sysconf("SC_PAGE_SIZE")
            if int(proc.name) == pid:
                own += resident
            elif int(stat[3]) == pid:
                children += resident
        except (OSError, IndexError, ValueError):
            continue
    return own, children


def _rss(pid: int) -> int:
    """Resident bytes of the server and its children (the SQL sandbox workers)."""
    return sum(_rss_parts(pid))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=22)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flight_share_soak_"))
    try:
        project = make_project(work / "project", REPO / "configs" / "demo" / "dlt.yml", events=2000)
        with ServerProcess(project) as server:
            return _soak(server, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _soak(server: ServerProcess, args: argparse.Namespace) -> int:
    connect(server.url)[DATASET].save(pa.table({"client": [-1], "seq": [-1]}), table_name="soak")
    latencies: dict[str, list[float]] = defaultdict(list)
    calls: dict[str, int] = defaultdict(int)
    errors: dict[str, list[str]] = defaultdict(list)
    acked: list[tuple[int, int]] = []
    lock = threading.Lock()
    stop = time.monotonic() + args.seconds
    rss = {"start": _rss(server.proc.pid), "peak": 0}
    samples: list[tuple[float, int, int]] = []  # (seconds since start, server process, workers)
    began = time.monotonic()

    def client(number: int) -> None:
        rng = random.Random(args.seed * 1000 + number)
        catalog = connect(server.url)
        seq = 0
        while time.monotonic() < stop:
            kind = rng.choice(["read", "read", "sql", "sql", "append", "refused_write", "refused_sql"])
            started = time.perf_counter()
            try:
                if kind == "read":
                    catalog[FROZEN]["issues_event"].arrow()
                elif kind == "sql":
                    catalog[FROZEN].sql("SELECT payload__action, count(*) AS n FROM issues_event GROUP BY 1").arrow()
                elif kind == "append":
                    catalog[DATASET].save(pa.table({"client": [number] * 50, "seq": [seq] * 50}), table_name="soak")
                    with lock:
                        acked.append((number, seq))
                    seq += 1
                elif kind == "refused_write":
                    try:
                        catalog[FROZEN].save(pa.table({"x": [1]}), table_name=f"nope_{number}")
                        raise AssertionError("a save into a frozen dataset was accepted")
                    except PipelineStepFailed:
                        pass
                else:
                    try:
                        catalog[FROZEN].sql("DROP TABLE issues_event").arrow()
                        raise AssertionError("DROP TABLE was accepted")
                    except InvalidRequestError:
                        pass
            except Exception as exc:  # noqa: BLE001 - counted and printed
                with lock:
                    errors[kind].append(f"{type(exc).__name__}: {str(exc)[:160]}")
            with lock:
                calls[kind] += 1
                latencies[kind].append(time.perf_counter() - started)

    def watch() -> None:
        while time.monotonic() < stop:
            own, workers = _rss_parts(server.proc.pid)
            rss["peak"] = max(rss["peak"], own + workers)
            samples.append((time.monotonic() - began, own, workers))
            time.sleep(0.5)  # a sampling interval, not synchronisation

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    watcher = threading.Thread(target=watch)
    for t in [*threads, watcher]:
        t.start()
    for t in [*threads, watcher]:
        t.join()
    rss["end"] = _rss(server.proc.pid)

    table = connect(server.url)[DATASET]["soak"].arrow()
    counts = pc.value_counts(pc.binary_join_element_wise(pc.cast(table["client"], pa.string()),
                                                         pc.cast(table["seq"], pa.string()), ":")).to_pylist()
    seen = {c["values"]: c["counts"] for c in counts}
    missing = [k for k in (f"{c}:{s}" for c, s in acked) if seen.get(k) != 50]
    print(f"{args.clients} clients, {args.seconds:.0f} s, server alive: {server.alive}")
    for kind in sorted(calls):
        values = sorted(latencies[kind])
        p50, p99 = values[len(values) // 2], values[min(len(values) - 1, int(len(values) * 0.99))]
        print(f"  {kind:14} calls {calls[kind]:6}  errors {len(errors[kind]):4}  p50 {p50 * 1000:8.1f} ms  "
              f"p99 {p99 * 1000:8.1f} ms")
        for text in sorted(set(errors[kind]))[:3]:
            print(f"      {text}")
    print(f"  appends acknowledged {len(acked)}, each present exactly once: {not missing} "
          f"({len(missing)} not)")
    print(f"  server RSS (with sandbox workers): start {rss['start'] >> 20} MiB, peak {rss['peak'] >> 20} MiB, "
          f"end {rss['end'] >> 20} MiB")
    if len(samples) >= 8:  # growth or a plateau: the server process alone, quarter by quarter (max of each)
        quarter = len(samples) // 4
        parts = [samples[i * quarter:(i + 1) * quarter] for i in range(4)]
        print("  server process RSS by quarter (max): " + ", ".join(
            f"{max(s[1] for s in part) >> 20}" for part in parts) + " MiB; workers: " + ", ".join(
            f"{max(s[2] for s in part) >> 20}" for part in parts) + " MiB")
    return 0 if server.alive and not missing and not any(errors.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
