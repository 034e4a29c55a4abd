"""SQL latency (issue 14): five queries through flight-share, roapi and each destination's own engine.

    python benchmarks/sql_latency.py [--rows 5000000] [--repeat 5] [--destinations duckdb,delta,postgres] [--s3]

One run, one process tree, on loopback only:

1. **Data.** A deterministic table ``t`` of ``--rows`` rows (numpy, seed 14): ``id`` int64 (0..rows-1, in
   order), ``value`` float64 in [0, 1), ``name`` string (1,000 distinct), ``ts`` timestamp[us, UTC],
   ``flag`` bool. A real dlt pipeline (in a subprocess: duckdb keeps a file lock while a process holds
   it) loads it into each destination of a temporary project: a duckdb file, a local Delta table
   (``filesystem`` + ``table_format: delta``), PostgreSQL (``PostgresServer``: a throwaway cluster on a
   free loopback port) and, with ``--s3``, a Delta table on the S3 test server (moto, ``S3Server``).
   The same rows are also written as one parquet file (pyarrow defaults) for roapi.
2. **Servers.** ``flight-share serve`` (``ServerProcess``) over the project, server settings at their
   defaults except ``sql_max_rows`` (raised above ``--rows`` so ``SELECT *`` is not refused); roapi
   (``roapi==0.12.7``, the ``bench`` extra; one process, a config file) over the parquet file and over the
   Delta tables that dlt wrote (local; S3 with ``--s3``), each table twice: loaded into memory at start
   (roapi's default: ``t``, ``d``, ``s``) and read from the files per query (``use_memory_table: false``:
   ``t_files``, ``d_files``, ``s_files``).
3. **Clients.** flight-share and roapi through the same client: the ADBC Flight SQL driver
   (``adbc_driver_flightsql.dbapi``, one connection per server, a fresh cursor per statement,
   ``execute`` + ``fetch_arrow_table``). The engines directly, in this process: duckdb over the same
   file (``read_only=True``, one connection); Delta through ``deltalake`` (the table's pyarrow dataset,
   opened once) scanned by an in-memory duckdb (filters and projections pushed into the dataset scan);
   PostgreSQL through ADBC's PostgreSQL driver (one connection).
4. **Timing.** Per destination: one untimed round that also checks the answers, then ``--repeat`` rounds;
   each round runs every query once on every target, the targets' order rotating each round. The figure
   is the best time (noise on shared cores only ever slows a run); the median is in the JSON. Reported per
   query: ms flight-share, ms per roapi table, ratio flight-share / roapi, ms engine, overhead
   flight-share / engine - 1. ``SELECT 1`` is the per-statement fixed cost (no data); the LIMIT 10 query
   is the fixed cost of a statement that names the table.
5. **Same answers.** In the checking round every target's result is cast to one schema, sorted where the
   query leaves the order open, and compared with the engine's (floats in the aggregate with a relative
   tolerance of 1e-9; ``LIMIT 10`` without ORDER BY: 10 rows each, any 10). Any difference: exit status 1.

Results: ``benchmarks/results/sql_latency.json`` (``--output``). Figures and the exact command:
``benchmarks/SQL.md``. 5M rows took about three minutes here (dlt's loads 19 s); ``--rows 50000000 --repeat 3
--no-check-scan`` took 16 minutes (loads 105 s, PostgreSQL's section 6 minutes) and wants ~8 GB of free memory
(roapi holds two copies of the table; ``--no-check-scan`` compares ``SELECT *`` by row count instead of
holding every target's full answer).
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
import pyarrow.parquet as pq  # noqa: E402

from flight_server.testing.servers import ServerProcess, stop_process  # noqa: E402
from flight_server.testing.services import PostgresServer, S3Server, free_port  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "sql_latency.json"
TABLE = "t"
SCHEMA = pa.schema([("id", pa.int64()), ("value", pa.float64()), ("name", pa.string()),
                    ("ts", pa.timestamp("us", tz="UTC")), ("flag", pa.bool_())])

# name -> (SQL with {t} for the table, how to compare answers: sort keys, or "any" for an open LIMIT)
QUERIES: dict[str, tuple[str, Any]] = {
    "select_1": ("SELECT 1 AS one", []),
    "point": ("SELECT * FROM {t} WHERE id = 4242", ["id"]),
    "limit": ("SELECT id, name FROM {t} LIMIT 10", "any"),
    "range": ("SELECT id, value FROM {t} WHERE id BETWEEN 1000000 AND 1100000", ["id"]),
    "group": ("SELECT name, count(*) AS n, sum(value) AS total FROM {t} WHERE flag AND value > 0.5 "
              "GROUP BY name ORDER BY n DESC, name LIMIT 10", []),
    "scan": ("SELECT * FROM {t}", ["id"]),
}
DESTINATIONS = ("duckdb", "delta", "postgres", "delta_s3")

STORES = {
    "duckdb": "  duck: {type: duckdb, location: _data/bench.duckdb}\n",
    "delta": "  lake: {type: filesystem, bucket_url: _data/lake, table_format: delta}\n",
    "postgres": (
        "  pg:\n    type: postgres\n    credentials:\n      host: \"{env.PG_HOST}\"\n      port: \"{env.PG_PORT}\"\n"
        "      username: \"{env.PG_USER}\"\n      password: \"{env.PG_PASSWORD}\"\n      database: \"{env.PG_DATABASE}\"\n"
    ),
    "delta_s3": (
        "  s3lake:\n    type: filesystem\n    bucket_url: s3://{env.S3_BUCKET}/lake\n    table_format: delta\n"
        "    credentials:\n      aws_access_key_id: \"{env.AWS_ACCESS_KEY_ID}\"\n"
        "      aws_secret_access_key: \"{env.AWS_SECRET_ACCESS_KEY}\"\n"
        "      endpoint_url: \"{env.S3_ENDPOINT_URL}\"\n      region_name: \"{env.S3_REGION}\"\n"
    ),
}
DESTINATION_NAME = {"duckdb": "duck", "delta": "lake", "postgres": "pg", "delta_s3": "s3lake"}


def dataset_of(kind: str) -> str:
    return f"{kind}_dataset"


def make_table(rows: int, seed: int = 14) -> pa.Table:
    """The deterministic table ``t``: ids in order, 1,000 names, one timestamp a second from 2024-01-01 UTC."""
    rng = np.random.default_rng(seed)
    names = np.array([f"name_{k:04d}" for k in range(1000)], dtype=object)
    start = np.datetime64("2024-01-01T00:00:00", "us")
    return pa.table({
        "id": pa.array(np.arange(rows, dtype=np.int64)),
        "value": pa.array(rng.random(rows)),
        "name": pa.array(names[rng.integers(0, len(names), rows)], pa.string()),
        "ts": pa.array(start + np.arange(rows, dtype=np.int64).astype("timedelta64[s]").astype("timedelta64[us]"),
                       pa.timestamp("us", tz="UTC")),
        "flag": pa.array(rng.random(rows) < 0.5),
    }, schema=SCHEMA)


def write_project(folder: Path, kinds: list[str], rows: int) -> Path:
    project = folder / "dlt.yml"
    project.write_text(
        "# written by benchmarks/sql_latency.py\nformat_version: 1\nproject: {name: sql_bench}\ndestinations:\n"
        + "".join(STORES[k] for k in kinds)
        + "datasets:\n" + "".join(f"  {dataset_of(k)}: {{destination: [{DESTINATION_NAME[k]}]}}\n" for k in kinds)
        + "profiles:\n  access:\n    datasets:\n" + "".join(f"      {dataset_of(k)}: {{}}\n" for k in kinds)
        + f"server: {{profile: access, sql_max_rows: {rows + 1}}}\n"
    )
    return project


LOADER = textwrap.dedent("""
    import sys, time, pyarrow as pa, dlt
    sys.path.insert(0, sys.argv[1])
    from flight_server.domain.config import load_project
    from flight_server.storage import open_storage
    project = load_project(sys.argv[2])
    table = pa.ipc.open_file(sys.argv[3]).read_all()
    for name in sys.argv[4:]:
        storage = open_storage(project, project.datasets[name])
        fmt = "parquet" if "parquet" in storage.capabilities().supported_loader_file_formats else None
        pipeline = dlt.pipeline("sql_bench_" + name, pipelines_dir=sys.argv[2] + ".pipelines",
                                destination=storage.dlt_destination(), dataset_name=name)
        resource = dlt.resource(table.to_batches(max_chunksize=1_000_000), name="t",
                                table_format=storage.destination_config.table_format)
        started = time.perf_counter()
        pipeline.run(resource, write_disposition="replace", loader_file_format=fmt).raise_on_failed_jobs()
        print(name, time.perf_counter() - started, flush=True)
        storage.close()
""")


def load_with_dlt(project: Path, data_file: Path, kinds: list[str], env: dict[str, str]) -> dict[str, float]:
    """Load the table into every destination with dlt pipelines, in a subprocess (duckdb's file lock)."""
    result = subprocess.run([sys.executable, "-c", LOADER, str(REPO), str(project), str(data_file),
                             *[dataset_of(k) for k in kinds]],
                            capture_output=True, text=True, env={**os.environ, **env}, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"dlt load failed:\n{result.stderr[-4000:]}")
    return {line.split()[0]: round(float(line.split()[1]), 2) for line in result.stdout.splitlines() if line.strip()}


class Roapi:
    """roapi serving tables over Flight SQL on a free loopback port (its HTTP and Postgres ports bound too).

    ``tables``: (name, uri, format, in memory). A config file, because the command line's ``-t`` takes
    no ``use_memory_table`` (``-t t=file.parquet,use_memory_table=false`` fails to parse in 0.12.7)."""

    def __init__(self, tables: list[tuple[str, str, str, bool]], folder: Path, env: dict[str, str] | None = None) -> None:
        binary = shutil.which("roapi", path=str(Path(sys.executable).parent)) or shutil.which("roapi")
        if binary is None:
            raise SystemExit("roapi not found: install the bench extra (make bench)")
        self.port = free_port()
        config = folder / "roapi.yml"
        config.write_text(
            f"addr:\n  http: 127.0.0.1:{free_port()}\n  postgres: 127.0.0.1:{free_port()}\n"
            f"  flight_sql: 127.0.0.1:{self.port}\ntables:\n"
            + "".join(f"  - name: {name}\n    uri: {json.dumps(uri)}\n    option:\n      format: {fmt}\n"
                      f"      use_memory_table: {'true' if memory else 'false'}\n" for name, uri, fmt, memory in tables))
        self.log = folder / "roapi.log"
        self.proc = subprocess.Popen([binary, "-c", str(config)], stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.url = f"grpc://127.0.0.1:{self.port}"

    def wait_ready(self, connect: Callable[[], Any], timeout: float = 300) -> Any:
        """roapi loads its tables before it listens: retry a connection and a query until it answers."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"roapi exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                conn = connect()
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.fetch_arrow_table()
                return conn
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                last = exc
                time.sleep(0.5)
        raise RuntimeError(f"roapi not ready within {timeout}s ({last}):\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_process(self.proc)


def flight_sql_runner(conn: Any) -> Callable[[str], pa.Table]:
    def run(sql: str) -> pa.Table:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetch_arrow_table()
    return run


def normalise(table: pa.Table) -> pa.Table:
    """One schema for every target's answer: known columns cast to the generated types, others to int64."""
    columns, names = [], []
    for name, column in zip(table.column_names, table.columns):
        if name in SCHEMA.names:
            target = SCHEMA.field(name).type
            if pa.types.is_timestamp(column.type) and column.type.tz is None:
                column = column.cast(pa.timestamp("us")).cast(target)  # assume UTC
            column = column.cast(target)
        elif name == "total":
            column = column.cast(pa.float64())
        else:
            column = column.cast(pa.int64())
        columns.append(column)
        names.append(name)
    return pa.table(columns, names=names)


def same_answer(query: str, answer: pa.Table, reference: pa.Table) -> str | None:
    """None when ``answer`` equals ``reference`` for ``query``; else what differs."""
    keys = QUERIES[query][1]
    a, r = normalise(answer), normalise(reference)
    if a.num_rows != r.num_rows:
        return f"{a.num_rows:,} rows, expected {r.num_rows:,}"
    if a.num_rows == 0:
        return None  # roapi answers an empty result with no columns at all
    if a.column_names != r.column_names:
        return f"columns {a.column_names}, expected {r.column_names}"
    if keys == "any":
        return None
    if keys:
        a = a.sort_by([(k, "ascending") for k in keys])
        r = r.sort_by([(k, "ascending") for k in keys])
    for name in a.column_names:
        x, y = a.column(name), r.column(name)
        if pa.types.is_floating(x.type) and name == "total":
            if not np.allclose(x.to_numpy(), y.to_numpy(), rtol=1e-9, atol=0):
                return f"column {name} differs beyond 1e-9"
        elif not x.equals(y):
            return f"column {name} differs"
    return None


def bench_destination(kind: str, targets: dict[str, Callable[[str], pa.Table]], sql: dict[str, dict[str, str]],
                      repeat: int, check_scan: bool) -> dict[str, Any]:
    """The checking round, then ``repeat`` interleaved rounds; ``sql[target][query]`` is the statement.

    A statement that fails in the checking round is a finding, not a crash: it is recorded (and counts as a
    different answer), and that target is not timed on that query."""
    names = list(targets)
    mismatches: list[str] = []
    errors: dict[str, dict[str, str]] = {q: {} for q in QUERIES}
    rows: dict[str, dict[str, int]] = {q: {} for q in QUERIES}

    def attempt(target: str, query: str) -> pa.Table | None:
        try:
            return targets[target](sql[target][query])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors[query][target] = f"{type(exc).__name__}: {exc}"[:400]
            mismatches.append(f"{kind} {query}: {target} failed: {errors[query][target]}")
            return None

    for query in QUERIES:  # untimed: warms every target and checks the answers against the engine's
        answers: dict[str, pa.Table] = {}
        for target in names:
            answer = attempt(target, query)
            if answer is None:
                continue
            rows[query][target] = answer.num_rows
            if query == "scan" and not check_scan:
                continue  # row counts only (memory at 50M rows)
            answers[target] = answer
        if query == "scan" and not check_scan:
            counts = set(rows[query].values())
            if len(counts) > 1:
                mismatches.append(f"{kind} {query}: row counts differ {rows[query]}")
            continue
        reference = answers.get("engine")
        for target, answer in answers.items():
            problem = "no answer from the engine to compare with" if reference is None else same_answer(query, answer, reference)
            if problem:
                mismatches.append(f"{kind} {query}: {target} {problem}")
        del answers, reference
    times: dict[str, dict[str, list[float]]] = {q: {t: [] for t in names} for q in QUERIES}
    for round_ in range(repeat):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for query in QUERIES:
            for target in order:
                if target in errors[query]:
                    continue
                started = time.perf_counter()
                result = attempt(target, query)
                if result is None:
                    continue
                times[query][target].append(time.perf_counter() - started)
                if result.num_rows != rows[query][target]:
                    mismatches.append(f"{kind} {query}: {target} returned {result.num_rows:,} rows, then {rows[query][target]:,}")
                del result

    def ratio(a: float | None, b: float | None, pct: bool = False) -> float | None:
        if a is None or b is None:
            return None
        return round((a / b - 1) * 100, 1) if pct else round(a / b, 2)

    out: dict[str, Any] = {"mismatches": mismatches, "queries": {}}
    for query in QUERIES:
        entry: dict[str, Any] = {"sql": sql["flight_share"][query], "rows": rows[query]}
        if errors[query]:
            entry["errors"] = errors[query]
        for target in names:
            t = times[query][target]
            entry[target] = ({"best_ms": round(min(t) * 1e3, 2), "median_ms": round(statistics.median(t) * 1e3, 2),
                              "times_ms": [round(x * 1e3, 2) for x in t]} if t else {"best_ms": None, "failed": True})
        fs = entry["flight_share"]["best_ms"]
        entry["ratio_vs_roapi"] = ratio(fs, entry["roapi_parquet"]["best_ms"])
        entry["ratio_vs_roapi_files"] = ratio(fs, entry["roapi_parquet_files"]["best_ms"])
        if "roapi_delta" in entry:
            entry["ratio_vs_roapi_delta"] = ratio(fs, entry["roapi_delta"]["best_ms"])
            entry["ratio_vs_roapi_delta_files"] = ratio(fs, entry["roapi_delta_files"]["best_ms"])
        entry["overhead_vs_engine_pct"] = ratio(fs, entry["engine"]["best_ms"], pct=True)
        out["queries"][query] = entry
    return out


def engine_for(kind: str, folder: Path, pg: PostgresServer | None, s3: S3Server | None) -> tuple[Callable[[str], pa.Table], str, Callable[[], None]]:
    """(run, table name in the engine's SQL, close) for the destination's own engine, in this process."""
    import duckdb

    if kind == "duckdb":
        con = duckdb.connect(str(folder / "_data" / "bench.duckdb"), read_only=True)
        return (lambda q: con.sql(q).arrow().read_all()), f"{dataset_of(kind)}.{TABLE}", con.close
    if kind in ("delta", "delta_s3"):
        from deltalake import DeltaTable

        if kind == "delta":
            uri, options = str(folder / "_data" / "lake" / dataset_of(kind) / TABLE), None
        else:
            assert s3 is not None
            uri = f"s3://{s3.bucket}/lake/{dataset_of(kind)}/{TABLE}"
            options = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                       "AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_REGION": s3.region, "AWS_ALLOW_HTTP": "true"}
        dataset = DeltaTable(uri, storage_options=options).to_pyarrow_dataset()
        con = duckdb.connect()
        con.register(TABLE, dataset)
        return (lambda q: con.sql(q).arrow().read_all()), TABLE, con.close
    if kind == "postgres":
        import adbc_driver_postgresql.dbapi as adbc_pg

        assert pg is not None
        conn = adbc_pg.connect(pg.url)
        conn.autocommit = True
        return flight_sql_runner(conn), f"{dataset_of(kind)}.{TABLE}", conn.close
    raise ValueError(kind)


def machine() -> dict[str, Any]:
    import deltalake
    import duckdb

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "pyarrow": pa.__version__,
            "duckdb": duckdb.__version__, "deltalake": deltalake.__version__, "platform": platform.platform()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows in t (default 5,000,000; 50,000,000 for scale)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds; best-of-N is reported (default 5)")
    parser.add_argument("--destinations", default="duckdb,delta,postgres",
                        help="comma-separated, from duckdb, delta, postgres, delta_s3 (default: the first three)")
    parser.add_argument("--s3", action="store_true", help="also a Delta table on the S3 test server (moto)")
    parser.add_argument("--no-check-scan", dest="check_scan", action="store_false",
                        help="check SELECT * by row count only (saves memory at 50M rows)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS.relative_to(REPO)})")
    parser.add_argument("--workdir", type=Path, help="keep the project, data and logs here (default: a temp folder, removed)")
    parser.add_argument("--markdown", type=Path, metavar="JSON",
                        help="print the tables of benchmarks/SQL.md from a results file and exit (no run)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    kinds = [k.strip() for k in args.destinations.split(",") if k.strip()]
    for k in kinds:
        if k not in DESTINATIONS:
            parser.error(f"unknown destination {k!r}")
    if args.s3 and "delta_s3" not in kinds:
        kinds.append("delta_s3")

    import adbc_driver_flightsql.dbapi as flight_sql

    started = time.perf_counter()
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="sql-latency-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    pg = s3 = None
    services: list[Any] = []
    env: dict[str, str] = {}
    results: dict[str, Any] = {
        "benchmark": "sql_latency", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/sql_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": args.rows, "repeat": args.repeat, "machine": machine(), "load_average_start": load_average(),
        "queries": {q: s.format(t="t") for q, (s, _) in QUERIES.items()}, "destinations": {},
    }
    try:
        if "postgres" in kinds:
            pg = PostgresServer().start()
            services.append(pg)
            env.update(pg.env)
        if "delta_s3" in kinds:
            s3 = S3Server().start()
            services.append(s3)
            env.update(s3.env)
        data = make_table(args.rows)
        print(f"{args.rows:,} rows, {data.nbytes / 1e6:.0f} MB Arrow; load average {load_average()}", flush=True)
        data_file = folder / "t.arrow"
        with pa.OSFile(str(data_file), "wb") as sink, pa.ipc.new_file(sink, data.schema) as writer:
            writer.write_table(data)
        parquet_file = folder / "t.parquet"
        pq.write_table(data, parquet_file)
        del data
        project = write_project(folder, kinds, args.rows)
        t0 = time.perf_counter()
        results["dlt_load_s"] = load_with_dlt(project, data_file, kinds, env)
        data_file.unlink()
        print(f"loaded with dlt in {time.perf_counter() - t0:.1f} s: {results['dlt_load_s']}", flush=True)

        # roapi: the parquet file and dlt's Delta tables, each loaded into memory (roapi's default: the
        # peer of the issue) and read from the files per query (use_memory_table: false)
        roapi_tables = [("t", str(parquet_file), "parquet", True), ("t_files", str(parquet_file), "parquet", False)]
        if "delta" in kinds:
            delta_uri = str(folder / "_data" / "lake" / dataset_of("delta") / TABLE)
            roapi_tables += [("d", delta_uri, "delta", True), ("d_files", delta_uri, "delta", False)]
        roapi_env: dict[str, str] = {}
        if s3 is not None:  # roapi's object store reads the S3 test server through the AWS_* variables
            s3_uri = f"s3://{s3.bucket}/lake/{dataset_of('delta_s3')}/{TABLE}"
            roapi_tables += [("s", s3_uri, "delta", True), ("s_files", s3_uri, "delta", False)]
            roapi_env = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                         "AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_REGION": s3.region, "AWS_ALLOW_HTTP": "true"}
        roapi = Roapi(roapi_tables, folder, env=roapi_env)
        services.append(roapi)
        t0 = time.perf_counter()
        roapi_conn = roapi.wait_ready(lambda: flight_sql.connect(roapi.url, autocommit=True))
        results["roapi_start_s"] = round(time.perf_counter() - t0, 2)
        server = ServerProcess(project, env=env)
        services.append(server)
        fs_conn = flight_sql.connect(server.url, autocommit=True)
        run_fs, run_roapi = flight_sql_runner(fs_conn), flight_sql_runner(roapi_conn)
        for kind in kinds:
            run_engine, engine_table, close_engine = engine_for(kind, folder, pg, s3)
            roapi_names = {"roapi_parquet": "t", "roapi_parquet_files": "t_files"}
            if kind in ("delta", "delta_s3"):  # roapi over the very Delta table dlt wrote
                prefix = "d" if kind == "delta" else "s"
                roapi_names.update(roapi_delta=prefix, roapi_delta_files=f"{prefix}_files")
            targets = {"flight_share": run_fs, **{name: run_roapi for name in roapi_names}}
            sql = {"flight_share": {q: s.format(t=f"{dataset_of(kind)}.{TABLE}") for q, (s, _) in QUERIES.items()}}
            for name, table_name in roapi_names.items():
                sql[name] = {q: s.format(t=table_name) for q, (s, _) in QUERIES.items()}
            targets["engine"] = run_engine
            sql["engine"] = {q: s.format(t=engine_table) for q, (s, _) in QUERIES.items()}
            load_before = load_average()
            t0 = time.perf_counter()
            try:
                entry = bench_destination(kind, targets, sql, args.repeat, args.check_scan)
            finally:
                close_engine()
            entry.update(load_average_before=load_before, load_average_after=load_average(),
                         wall_s=round(time.perf_counter() - t0, 1))
            results["destinations"][kind] = entry
            print(summary_of(kind, entry), flush=True)
        fs_conn.close()
        roapi_conn.close()
    finally:
        for service in reversed(services):
            service.stop()
        if args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["load_average_end"] = load_average()
    mismatches = [m for entry in results["destinations"].values() for m in entry["mismatches"]]
    results["answers_agree"] = not mismatches
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.output}  ({results['wall_s']} s; load average at the end {results['load_average_end']})")
    for m in mismatches:
        print(f"DIFFERENT ANSWER: {m}", file=sys.stderr)
    return 1 if mismatches else 0


def _ms(value: float | None) -> str:
    return "failed" if value is None else f"{value:.1f}"


def _x(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{a / b:.2f}×"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:+.0f} %"


def summary_of(kind: str, entry: dict[str, Any]) -> str:
    first = next(iter(entry["queries"].values()))
    peers = [t for t in ("roapi_parquet", "roapi_parquet_files", "roapi_delta", "roapi_delta_files") if t in first]
    short = {"roapi_parquet": "roapi", "roapi_parquet_files": "roapi files", "roapi_delta": "roapi delta",
             "roapi_delta_files": "roapi delta files"}
    lines = [f"\n{kind} (load average {entry['load_average_before']} -> {entry['load_average_after']}; best ms)",
             f"{'query':9} {'rows':>10} {'flight-share':>12}" + "".join(f" {short[p]:>17} {'ratio':>6}" for p in peers)
             + f" {'engine':>8} {'overhead':>9}"]
    for query, e in entry["queries"].items():
        fs = e["flight_share"]["best_ms"]
        lines.append(f"{query:9} {e['rows'].get('flight_share', -1):>10,} {_ms(fs):>12}"
                     + "".join(f" {_ms(e[p]['best_ms']):>17} {_x(fs, e[p]['best_ms']):>6}" for p in peers)
                     + f" {_ms(e['engine']['best_ms']):>8} {_pct(e['overhead_vs_engine_pct']):>9}")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The per-destination tables of SQL.md, from a results file (figures never typed by hand)."""
    out = [f"{results['rows']:,} rows, best of {results['repeat']}, {results['date']}; "
           f"load average at the start {results['load_average_start']}, at the end {results.get('load_average_end')}"]
    for kind, entry in results["destinations"].items():
        first = next(iter(entry["queries"].values()))
        delta = "roapi_delta" in first
        out += ["", f"### {kind} (load average {entry['load_average_before']} → {entry['load_average_after']})", "",
                "| query | rows | flight-share ms | roapi ms | ratio | roapi files ms | ratio"
                + (" | roapi Delta ms | ratio | roapi Delta files ms | ratio" if delta else "")
                + " | engine ms | overhead |",
                "|---|--:|--:|--:|--:|--:|--:|" + ("--:|--:|--:|--:|" if delta else "") + "--:|--:|"]
        for query, e in entry["queries"].items():
            fs = e["flight_share"]["best_ms"]
            row = (f"| {query} | {e['rows'].get('flight_share', -1):,} | {_ms(fs)} "
                   f"| {_ms(e['roapi_parquet']['best_ms'])} | {_x(fs, e['roapi_parquet']['best_ms'])} "
                   f"| {_ms(e['roapi_parquet_files']['best_ms'])} | {_x(fs, e['roapi_parquet_files']['best_ms'])} ")
            if delta:
                row += (f"| {_ms(e['roapi_delta']['best_ms'])} | {_x(fs, e['roapi_delta']['best_ms'])} "
                        f"| {_ms(e['roapi_delta_files']['best_ms'])} | {_x(fs, e['roapi_delta_files']['best_ms'])} ")
            row += f"| {_ms(e['engine']['best_ms'])} | {_pct(e['overhead_vs_engine_pct'])} |"
            out.append(row)
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
