"""Destination read benchmark: Delta Lake with parallel endpoints, PostgreSQL through the server vs. directly.

One run measures, on this machine, with client and servers on loopback:

* Delta Lake (local folder, loaded by dlt): one table of ``--rows`` rows (default 10,000,000) read
  through ``flight-share serve`` as one stream and as 2 and 4 endpoints fetched in parallel by the
  Python client; against two baselines from the same run — the same files read in-process with
  ``deltalake`` (no Flight), and the same rows served from memory by a bare pyarrow Flight server
  (the transport ceiling).
* PostgreSQL (a throwaway server, loaded by dlt): one table of ``--pg-rows`` rows read through
  ``flight-share serve`` (1 and 4 endpoints) versus psycopg2 ``fetchall()`` and ADBC's
  ``fetch_arrow_table()`` directly.

Times are best-of-``--repeats`` (noise on shared cores only ever slows a run) with the median next
to it; throughput is Arrow bytes of the result per second. Results go to
``benchmarks/results/destinations-<UTC time>.json``; see ``benchmarks/DESTINATIONS.md``.

    python benchmarks/destinations.py            # the full run (10M Delta rows, 1M PostgreSQL rows)
    python benchmarks/destinations.py --quick    # 1M / 100k rows, 3 repeats: a minute or so
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.flight as flight  # noqa: E402

from client._transport import Connection  # noqa: E402
from client.protocol import ReadCommand  # noqa: E402
from flight_server.testing.servers import ServerProcess  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
LOADS = 4  # the tables are written by this many dlt loads (Delta: one file set per load)


def make_table(rows: int, seed: int = 7) -> pa.Table:
    """Five columns like an events table: ~39 Arrow bytes per row."""
    rng = np.random.default_rng(seed)
    categories = np.array([f"category_{k:02d}" for k in range(20)])
    start = np.datetime64("2024-01-01T00:00:00", "us")
    return pa.table({
        "id": pa.array(np.arange(rows, dtype=np.int64)),
        "created_at": pa.array(start + rng.integers(0, 365 * 86_400_000_000, rows).astype("timedelta64[us]"),
                               pa.timestamp("us", tz="UTC")),
        "category": pa.array(categories[rng.integers(0, len(categories), rows)]),
        "value": pa.array(rng.random(rows)),
        "flag": pa.array(rng.random(rows) < 0.5),
    })


def timed(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    nbytes = result.nbytes if isinstance(result, pa.Table) else None
    rows = result.num_rows if isinstance(result, pa.Table) else len(result)
    return {"best_s": round(min(times), 4), "median_s": round(statistics.median(times), 4),
            "times_s": [round(t, 4) for t in times], "rows": rows, "arrow_bytes": nbytes}


def with_rate(entry: dict[str, Any], nbytes: int) -> dict[str, Any]:
    entry["gb_per_s_best"] = round(nbytes / entry["best_s"] / 1e9, 3)
    return entry


def project_file(folder: Path, store: str, endpoint_rows: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    project = folder / "dlt.yml"
    project.write_text(
        "project: {name: bench}\ndestinations:\n" + store
        + "datasets:\n  bench_dataset: {destination: [store]}\n"
        + "profiles:\n  access:\n    datasets:\n      bench_dataset: {}\n"
        + f"server: {{profile: access, endpoint_rows: {endpoint_rows}}}\n"
    )
    return project


def load_with_dlt(project: Path, table: pa.Table, env: dict[str, str]) -> float:
    """Load the table with a dlt pipeline into the project's destination (as users' pipelines do)."""
    code = textwrap.dedent(f"""
        import sys, time, pyarrow as pa, dlt
        LOADS = {LOADS}
        sys.path.insert(0, {str(REPO)!r})
        from flight_server.domain.config import load_project
        from flight_server.storage import open_storage
        project = load_project({str(project)!r})
        storage = open_storage(project, project.datasets["bench_dataset"])
        table = pa.ipc.open_file({str(project.parent / "data.arrow")!r}).read_all()
        fmt = "parquet" if "parquet" in storage.capabilities().supported_loader_file_formats else None
        pipeline = dlt.pipeline("bench_load", pipelines_dir={str(project.parent / "pipelines")!r},
                                destination=storage.dlt_destination(), dataset_name="bench_dataset")
        started = time.perf_counter()
        step = -(-table.num_rows // LOADS)
        for k in range(LOADS):  # the table grows by several loads, as tables do (one Delta commit each)
            part = table.slice(k * step, step)
            resource = dlt.resource(part.to_batches(max_chunksize=1_000_000), name="events",
                                    table_format=storage.destination_config.table_format)
            pipeline.run(resource, write_disposition="replace" if k == 0 else "append",
                         loader_file_format=fmt).raise_on_failed_jobs()
        print(time.perf_counter() - started)
    """)
    with pa.OSFile(str(project.parent / "data.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, **env}, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-4000:])
    (project.parent / "data.arrow").unlink()
    return float(result.stdout.strip().splitlines()[-1])


def read_through_server(project: Path, env: dict[str, str], repeats: int, parallel: int) -> dict[str, Any]:
    with ServerProcess(project, env=env) as server:
        connection = Connection(server.url)
        connection.parallel_endpoints = parallel
        command = ReadCommand("bench_dataset", "events", ("id", "created_at", "category", "value", "flag"))
        info = connection.flight_info(command)
        connection.table(command)  # warm: schema, files, connections
        entry = timed(lambda: connection.table(command), repeats)
        entry.update(endpoints=len(info.endpoints), total_records=info.total_records, total_bytes=info.total_bytes)
        connection.close()
    return entry


BARE_SERVER = """
import sys, pyarrow as pa, pyarrow.flight as flight
from deltalake import DeltaTable
table = DeltaTable(sys.argv[1]).to_pyarrow_dataset().to_table(columns=sys.argv[2].split(","))
batches = table.combine_chunks().to_batches(max_chunksize=122_880)
class Bare(flight.FlightServerBase):
    def do_get(self, context, ticket):
        return flight.RecordBatchStream(pa.RecordBatchReader.from_batches(table.schema, batches))
server = Bare("grpc://127.0.0.1:0")
print(server.port, flush=True)
server.serve()
"""


def bare_flight_ceiling(uri: str, columns: list[str], repeats: int) -> dict[str, Any]:
    """The same rows from memory through a bare pyarrow Flight server (one stream)."""
    proc = subprocess.Popen([sys.executable, "-c", BARE_SERVER, uri, ",".join(columns)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        client = flight.connect(f"grpc://127.0.0.1:{port}")
        client.do_get(flight.Ticket(b"")).read_all()
        return timed(lambda: client.do_get(flight.Ticket(b"")).read_all(), repeats)
    finally:
        proc.terminate()
        proc.wait(10)


def delta_benchmark(rows: int, repeats: int, work: Path) -> dict[str, Any]:
    from deltalake import DeltaTable

    table = make_table(rows)
    columns = table.column_names
    store = "  store: {type: filesystem, bucket_url: _data/lake, table_format: delta}\n"
    base = project_file(work / "delta", store, rows + 1)
    load_s = load_with_dlt(base, table, {})
    nbytes = table.nbytes
    del table
    uri = str(work / "delta" / "_data" / "lake" / "bench_dataset" / "events")
    dtable = DeltaTable(uri)
    files = pa.table(dtable.get_add_actions(flatten=False))
    row_groups = sum(f.num_row_groups for f in dtable.to_pyarrow_dataset().get_fragments())
    result: dict[str, Any] = {
        "rows": rows, "arrow_bytes": nbytes, "dlt_load_s": round(load_s, 2), "delta_files": files.num_rows,
        "parquet_row_groups": row_groups, "parquet_bytes": int(sum(files.column("size_bytes").to_pylist())),
    }
    result["deltalake_in_process"] = with_rate(
        timed(lambda: DeltaTable(uri).to_pyarrow_dataset().to_table(columns=columns), repeats), nbytes)
    result["bare_flight_from_memory"] = with_rate(bare_flight_ceiling(uri, columns, repeats), nbytes)
    for endpoints in (1, 2, 4):
        folder = work / f"delta-{endpoints}"
        project = project_file(folder, store.replace("_data/lake", str(work / "delta" / "_data" / "lake")),
                               -(-rows // endpoints))
        entry = with_rate(read_through_server(project, {}, repeats, parallel=endpoints), nbytes)
        label = "one_stream" if endpoints == 1 else f"{endpoints}_endpoints_parallel"
        result[f"server_{label}"] = entry
    one = result["server_one_stream"]["best_s"]
    for key in ("server_2_endpoints_parallel", "server_4_endpoints_parallel"):
        result[key]["speedup_vs_one_stream"] = round(one / result[key]["best_s"], 2)
    ceiling = result["bare_flight_from_memory"]["best_s"]
    for key in ("server_one_stream", "server_2_endpoints_parallel", "server_4_endpoints_parallel"):
        result[key]["ratio_to_bare_flight"] = round(ceiling / result[key]["best_s"], 2)
    return result


def postgres_benchmark(rows: int, repeats: int, work: Path) -> dict[str, Any]:
    import adbc_driver_postgresql.dbapi as adbc
    import psycopg2

    from flight_server.testing.services import PostgresServer

    pg = PostgresServer().start()
    try:
        store = ("  store:\n    type: postgres\n    credentials:\n      host: \"{env.PG_HOST}\"\n"
                 "      port: \"{env.PG_PORT}\"\n      username: \"{env.PG_USER}\"\n"
                 "      password: \"{env.PG_PASSWORD}\"\n      database: \"{env.PG_DATABASE}\"\n")
        table = make_table(rows)
        columns = table.column_names
        base = project_file(work / "pg", store, rows + 1)
        load_s = load_with_dlt(base, table, pg.env)
        del table
        sql = f"SELECT {', '.join(columns)} FROM bench_dataset.events"
        with adbc.connect(pg.url) as con, con.cursor() as cur:
            cur.execute(sql)
            nbytes = cur.fetch_arrow_table().nbytes
        result: dict[str, Any] = {"rows": rows, "arrow_bytes": nbytes, "dlt_load_s": round(load_s, 2)}

        # direct clients keep one open connection, as the server's pool does (connecting is not timed)
        psycopg_con = psycopg2.connect(pg.url)
        adbc_con = adbc.connect(pg.url)

        def psycopg_fetchall() -> list:
            with psycopg_con.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()

        def adbc_arrow() -> pa.Table:
            with adbc_con.cursor() as cur:
                cur.execute(sql)
                return cur.fetch_arrow_table()

        try:
            result["psycopg2_fetchall"] = with_rate(timed(psycopg_fetchall, repeats), nbytes)
            result["adbc_fetch_arrow_table"] = with_rate(timed(adbc_arrow, repeats), nbytes)
        finally:
            psycopg_con.close()
            adbc_con.close()
        for endpoints in (1, 4):
            project = project_file(work / f"pg-{endpoints}", store, -(-rows // endpoints))
            label = "one_stream" if endpoints == 1 else f"{endpoints}_endpoints_parallel"
            result[f"server_{label}"] = with_rate(read_through_server(project, pg.env, repeats, endpoints), nbytes)
        adbc_best = result["adbc_fetch_arrow_table"]["best_s"]
        for key in ("psycopg2_fetchall", "server_one_stream", "server_4_endpoints_parallel"):
            result[key]["ratio_to_adbc"] = round(adbc_best / result[key]["best_s"], 2)
        return result
    finally:
        pg.stop()


def machine() -> dict[str, Any]:
    import deltalake
    import duckdb

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "pyarrow": pa.__version__,
            "deltalake": deltalake.__version__, "duckdb": duckdb.__version__, "platform": platform.platform()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows in the Delta table")
    parser.add_argument("--pg-rows", type=int, default=1_000_000, help="rows in the PostgreSQL table")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (best-of)")
    parser.add_argument("--quick", action="store_true", help="1,000,000 Delta rows, 100,000 PostgreSQL rows, 3 repeats")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.pg_rows, args.repeats = 1_000_000, 100_000, 3
    work = Path(tempfile.mkdtemp(prefix="flight_share_bench_"))
    started = time.perf_counter()
    try:
        results = {
            "benchmark": "destinations", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(), "repeats": args.repeats, "quick": args.quick,
            "delta": delta_benchmark(args.rows, args.repeats, work),
            "postgres": postgres_benchmark(args.pg_rows, args.repeats, work),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    out = args.out or RESULTS / f"destinations-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))
    print(f"results: {out}")
    return results


def summary(results: dict[str, Any]) -> str:
    lines = []
    for section in ("delta", "postgres"):
        r = results[section]
        lines.append(f"{section}: {r['rows']:,} rows, {r['arrow_bytes'] / 1e6:.0f} MB Arrow")
        for key, entry in r.items():
            if isinstance(entry, dict) and "best_s" in entry:
                extra = {k: v for k, v in entry.items() if k.startswith(("speedup", "ratio", "endpoints"))}
                lines.append(f"  {key:32s} best {entry['best_s']:7.3f} s  median {entry['median_s']:7.3f} s  "
                             f"{entry['gb_per_s_best']:6.3f} GB/s  {extra}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
