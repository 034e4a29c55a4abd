"""Write throughput: N rows through a flight-share server versus ``pipeline.run`` in-process.

    python benchmarks/write_throughput.py [--rows 10000000] [--repeat 3]

Both sides load the same deterministic Arrow table (int64, timestamp, short string, float64, bool)
into a fresh duckdb file per repetition. The baseline is plain ``pipeline.run`` with dlt's defaults
(issue 13): no ``_dlt_id`` and no ``_dlt_load_id`` for Arrow items; the server adds ``_dlt_load_id``
(the lineage key) and ``_dlt_id`` only where a stored table requires it (not here: a new table):

(a) server: ``flight-share serve`` in its own process over a fresh project; the client calls
    ``Dataset.save(table, table_name=...)`` (DoPut, 65,536-row batches). Timed from the call to its
    return: upload, contract check, extract, normalize, load and the client's catalog refresh.
(b) in-process: ``dlt.pipeline(...).run(table, table_name=...)`` into a fresh duckdb file. Timed around
    ``run``.

Both are timed warm: dlt's lazily imported modules and duckdb's first connection are paid by a small
warm-up write (the server into a separate dataset and file, the in-process run into a throw-away
file) before the timed one, so the figures are throughput, not interpreter start-up. The cold first
put is reported separately. Best-of-N is the headline (noise on shared cores only ever slows a run);
every run's time is kept in the JSON, with the CPU seconds each side used (server side: server
process plus client process), which other load on the machine inflates much less than wall time.
Rows that landed are counted in the duckdb file in both cases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# the baseline is dlt's defaults: no dlt settings in this process or the server's environment
for _key in [k for k in os.environ if "PARQUET_NORMALIZER" in k]:
    del os.environ[_key]

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402

from client import connect  # noqa: E402
from flight_server.testing.servers import ServerProcess  # noqa: E402

DATASET = "open_dataset"
TABLE = "bench_rows"
RESULTS = REPO / "benchmarks" / "results" / "write_throughput.json"

PROJECT = """\
# written by benchmarks/write_throughput.py: one open dataset to measure, one to warm the server up
format_version: 1
project:
  name: write_benchmark
destinations:
  bench: {type: duckdb, location: _data/bench.duckdb}
  warmup: {type: duckdb, location: _data/warmup.duckdb}
datasets:
  open_dataset: {destination: [bench]}
  warmup_dataset: {destination: [warmup]}
profiles:
  access:
    datasets:
      open_dataset: {}
      warmup_dataset: {}
server:
  profile: access
  max_put_bytes: 68719476736
"""


def make_table(rows: int, seed: int = 42) -> pa.Table:
    """Deterministic rows: int64 id, UTC timestamp, short string, float64, bool."""
    rng = np.random.default_rng(seed)
    names = np.array([f"user_{i:04d}" for i in range(1000)], dtype=object)
    start = np.datetime64("2024-01-01T00:00:00", "us")
    return pa.table({
        "id": pa.array(np.arange(rows, dtype=np.int64)),
        "created_at": pa.array(start + rng.integers(0, 365 * 86_400_000_000, rows).astype("timedelta64[us]"),
                               type=pa.timestamp("us", tz="UTC")),
        "user_name": pa.array(names[rng.integers(0, len(names), rows)], type=pa.string()),
        "amount": pa.array(rng.standard_normal(rows) * 100.0),
        "is_active": pa.array(rng.random(rows) < 0.5),
    })


def own_cpu() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(proc: psutil.Process) -> float:
    """CPU seconds another process and its waited-for children have used."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def count_rows(duckdb_file: Path, dataset: str, table: str) -> int:
    with duckdb.connect(str(duckdb_file), read_only=True) as con:
        return int(con.execute(f'SELECT count(*) FROM "{dataset}"."{table}"').fetchone()[0])


def run_server(data: pa.Table, folder: Path) -> dict[str, Any]:
    """One repetition against a fresh project and a fresh server process."""
    folder.mkdir(parents=True)
    project = folder / "dlt.yml"
    project.write_text(PROJECT)
    warm = data.slice(0, min(1000, data.num_rows))
    with ServerProcess(project) as server:
        catalog = connect(server.url)
        t0 = time.perf_counter()
        catalog.dataset("warmup_dataset").save(warm, table_name=TABLE)
        cold = time.perf_counter() - t0
        dataset = catalog.dataset(DATASET)
        server_proc = psutil.Process(server.proc.pid)
        server_cpu, client_cpu = process_cpu(server_proc), own_cpu()
        t0 = time.perf_counter()
        info = dataset.save(data, table_name=TABLE)
        seconds = time.perf_counter() - t0
        server_cpu, client_cpu = process_cpu(server_proc) - server_cpu, own_cpu() - client_cpu
        served = dataset.table(TABLE).row_count()
        catalog.close()
        server.stop()
    landed = count_rows(folder / "_data" / "bench.duckdb", DATASET, TABLE)
    return {"seconds": seconds, "cpu_seconds": server_cpu + client_cpu, "server_cpu_seconds": server_cpu,
            "client_cpu_seconds": client_cpu, "cold_warmup_put_seconds": cold, "rows_landed": landed,
            "rows_reported_by_server": served, "load_info_rows": info.rows, "server_load_step_seconds": info.load_seconds,
            "failed_jobs": info.failed_jobs}


LOAD_ID_SETTING = "NORMALIZE__PARQUET_NORMALIZER__ADD_DLT_LOAD_ID"


def run_in_process(data: pa.Table, folder: Path, load_id: bool = False) -> dict[str, Any]:
    """One repetition of pipeline.run into a fresh duckdb file with dlt's defaults; ``load_id``: with
    ``_dlt_load_id`` on every row as well (what the server writes into a new table)."""
    import dlt

    folder.mkdir(parents=True)
    target = folder / "bench.duckdb"
    os.environ[LOAD_ID_SETTING] = "true" if load_id else "false"
    try:
        pipeline = dlt.pipeline("bench_in_process_pipeline", pipelines_dir=str(folder / "pipelines"),
                                destination=dlt.destinations.duckdb(str(target)), dataset_name=DATASET)
        cpu, t0 = own_cpu(), time.perf_counter()
        info = pipeline.run(data, table_name=TABLE)
        seconds, cpu = time.perf_counter() - t0, own_cpu() - cpu
    finally:
        os.environ.pop(LOAD_ID_SETTING, None)
    failed = sum(len(p.jobs.get("failed_jobs", [])) for p in info.load_packages)
    landed = count_rows(target, DATASET, TABLE)
    return {"seconds": seconds, "cpu_seconds": cpu, "rows_landed": landed, "failed_jobs": failed}


def warm_in_process(data: pa.Table, folder: Path) -> float:
    """Import and first-run costs of dlt in this process, paid once, off the clock of the timed runs."""
    t0 = time.perf_counter()
    run_in_process(data.slice(0, min(1000, data.num_rows)), folder)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows to write (default 10,000,000)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each side; best-of-N is reported")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS.relative_to(REPO)})")
    parser.add_argument("--keep", action="store_true", help="keep the temporary projects and duckdb files")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    data = make_table(args.rows)
    gen_seconds = time.perf_counter() - t0
    print(f"{args.rows:,} rows, {data.nbytes / 1e6:.1f} MB of Arrow, generated in {gen_seconds:.2f} s; "
          f"{args.repeat} repetition(s) per side", flush=True)

    work = Path(tempfile.mkdtemp(prefix="flight-share-write-bench-"))
    runs: dict[str, list[dict[str, Any]]] = {"server": [], "in_process": [], "in_process_load_id": []}
    try:
        warm_seconds = warm_in_process(data, work / "warmup-in-process")
        for i in range(args.repeat):  # alternate the sides so drift on the machine hits both alike
            sides = (("server", run_server), ("in_process", run_in_process),
                     ("in_process_load_id", lambda d, f: run_in_process(d, f, load_id=True)))
            for side, fn in sides:
                result = fn(data, work / f"{side}-{i}")
                if not args.keep:
                    shutil.rmtree(work / f"{side}-{i}", ignore_errors=True)
                ok = result["rows_landed"] == args.rows and not result["failed_jobs"]
                result["rows_ok"] = ok
                runs[side].append(result)
                print(f"  {side:<18} run {i + 1}: {result['seconds']:8.2f} s  rows landed {result['rows_landed']:,}"
                      f"{'' if ok else '  <-- WRONG'}", flush=True)
                if not ok:
                    raise SystemExit(f"{side} run {i + 1}: expected {args.rows} rows, found {result['rows_landed']} "
                                     f"(failed jobs: {result['failed_jobs']})")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    summary: dict[str, Any] = {}
    for side, results in runs.items():
        times = [r["seconds"] for r in results]
        cpus = [r["cpu_seconds"] for r in results]
        best = min(times)
        summary[side] = {
            "best_seconds": round(best, 3),
            "median_seconds": round(statistics.median(times), 3),
            "all_seconds": [round(t, 3) for t in times],
            "best_cpu_seconds": round(min(cpus), 3),
            "rows_per_second": round(args.rows / best),
            "mb_per_second": round(data.nbytes / 1e6 / best, 1),
        }
    ratio = summary["server"]["best_seconds"] / summary["in_process"]["best_seconds"]
    cpu_ratio = summary["server"]["best_cpu_seconds"] / summary["in_process"]["best_cpu_seconds"]
    like_ratio = summary["server"]["best_seconds"] / summary["in_process_load_id"]["best_seconds"]
    report = {
        "benchmark": "write_throughput",
        "rows": args.rows,
        "arrow_bytes": data.nbytes,
        "columns": {f.name: str(f.type) for f in data.schema},
        "repeat": args.repeat,
        "dlt_settings": "defaults (baseline); the server: _dlt_load_id, and _dlt_id only where a stored table requires it",
        "server": summary["server"],
        "in_process": summary["in_process"],
        "in_process_load_id": summary["in_process_load_id"],
        "ratio_server_over_in_process": round(ratio, 3),
        "ratio_server_over_in_process_load_id": round(like_ratio, 3),
        "target_ratio": 1.0,
        "meets_target": ratio <= 1.0,
        "cpu_ratio_server_over_in_process": round(cpu_ratio, 3),
        "runs": runs,
        "in_process_warmup_seconds": round(warm_seconds, 3),
        "environment": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "versions": _versions(),
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(f"{'side':<19}{'best s':>10}{'median s':>10}{'rows/s':>14}{'MB/s':>8}{'CPU s':>8}")
    for side in runs:
        s = summary[side]
        print(f"{side:<19}{s['best_seconds']:>10.2f}{s['median_seconds']:>10.2f}{s['rows_per_second']:>14,}"
              f"{s['mb_per_second']:>8.1f}{s['best_cpu_seconds']:>8.2f}")
    print(f"ratio server / in-process (best-of-{args.repeat}): {ratio:.2f}x (target <= 1.0x) "
          f"{'OK' if ratio <= 1.0 else 'MISSED'}; CPU seconds ratio {cpu_ratio:.2f}x")
    print(f"ratio server / in-process with _dlt_load_id (the same rows the server writes): {like_ratio:.2f}x")
    print(f"results: {args.output}")
    return 0


def _versions() -> dict[str, str]:
    import dlt

    return {"dlt": dlt.__version__, "pyarrow": pa.__version__, "duckdb": duckdb.__version__, "numpy": np.__version__}


if __name__ == "__main__":
    sys.exit(main())
