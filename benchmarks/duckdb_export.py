"""Where flight-share's read time goes: duckdb's Arrow export, in process, without Flight.

    python benchmarks/duckdb_export.py [--rows 10000000] [--repeat 7] [--workdir DIR]

Builds the same dlt-loaded duckdb table as ``read_throughput.py`` (or reuses ``--workdir`` from a
``read_throughput.py --workdir DIR`` run) and drains ``to_arrow_reader`` in this process:

* per column, to show which types cost the most to convert to Arrow;
* the whole table with duckdb ``threads`` 1 and 2 and several batch sizes;
* a scan that converts nothing (an aggregate), to split scan cost from conversion cost.

Nothing here touches the network, so these are upper bounds for the duckdb read path: a Flight read
of the table cannot be faster than draining the reader.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import duckdb  # noqa: E402
from read_throughput import DATASET, TABLE, build_project, generate_table  # noqa: E402


def drain(con: duckdb.DuckDBPyConnection, sql: str, batch: int, repeat: int) -> tuple[float, int]:
    """Best-of-``repeat`` seconds to drain ``sql`` through ``to_arrow_reader``, and the Arrow bytes."""
    best, nbytes = float("inf"), 0
    for _ in range(repeat):
        cur = con.cursor()
        cur.execute("SET TimeZone = 'UTC'")
        t0 = time.perf_counter()
        nbytes = sum(b.nbytes for b in cur.sql(sql).to_arrow_reader(batch))
        best = min(best, time.perf_counter() - t0)
        cur.close()
    return best, nbytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--workdir", help="a project folder from read_throughput.py --workdir (reused if loaded)")
    parser.add_argument("--json", default=str(HERE / "results" / "duckdb_export.json"))
    args = parser.parse_args()

    folder = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="flight_share_export_"))
    db = folder / "_data" / "bench.duckdb"
    if not db.exists():
        build_project(folder, generate_table(args.rows, 42))
    con = duckdb.connect(str(db), read_only=True)
    table = f'"{DATASET}"."{TABLE}"'
    columns = [r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ? "
        "ORDER BY ordinal_position", [DATASET, TABLE]).fetchall()]
    everything = f"SELECT {', '.join(columns)} FROM {table}"
    rows = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    results: dict = {"rows": rows, "columns": {}, "whole_table": {}}

    print(f"{rows:,} rows; duckdb {duckdb.__version__}; best of {args.repeat}\n")
    print(f"{'what':44s} {'best s':>7s} {'MB':>6s} {'GB/s':>6s}")
    con.execute("SET threads = 1")
    for column in columns:
        seconds, nbytes = drain(con, f"SELECT {column} FROM {table}", 122_880, args.repeat)
        results["columns"][column] = {"seconds": seconds, "arrow_bytes": nbytes}
        print(f"{'column ' + column + ' (threads 1)':44s} {seconds:7.3f} {nbytes / 1e6:6.0f} {nbytes / seconds / 1e9:6.2f}")
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        con.execute(f"SELECT sum(id), max(created_at), sum(length(name)), sum(value), count(flag) FROM {table}").fetchall()
    scan = (time.perf_counter() - t0) / args.repeat
    results["scan_without_arrow_seconds_mean"] = scan
    print(f"{'scan + aggregate, no Arrow (threads 1, mean)':44s} {scan:7.3f}")
    for threads in (1, 2):
        con.execute(f"SET threads = {threads}")
        for batch in (65_536, 122_880, 262_144, 1_048_576):
            seconds, nbytes = drain(con, everything, batch, args.repeat)
            results["whole_table"][f"threads={threads},batch={batch}"] = {"seconds": seconds, "arrow_bytes": nbytes}
            print(f"{f'whole table, threads {threads}, batch {batch:,}':44s} {seconds:7.3f} {nbytes / 1e6:6.0f} "
                  f"{nbytes / seconds / 1e9:6.2f}")
    con.close()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
