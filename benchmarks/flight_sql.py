"""The same query three ways, in one run: Flight SQL via ADBC, our plain DoGet, a bare pyarrow server.

    python benchmarks/flight_sql.py [--rows 10000000] [--repeat 3]

Builds a throw-away project in a temp folder with one duckdb dataset holding ``--rows`` rows (loaded by a
real dlt pipeline), serves it with ``flight-share serve``, and times ``SELECT * FROM numbers`` read to the
end as Arrow through

1. the ADBC Flight SQL driver (Go): prepare, GetFlightInfo, DoGet — ``cursor.fetch_arrow_table()``;
2. our plain surface: a JSON ``sql`` command, GetFlightInfo + DoGet with ``pyarrow.flight``;
3. the ceiling: a bare pyarrow Flight server (another process) streaming the same table from memory.

Times are best-of-``--repeat`` (noise on shared cores only ever slows a run). The target is Flight SQL
within 10% of plain DoGet: both end in the same sandbox reader handed to Flight; Flight SQL adds one
prepare round trip and a LIMIT 0 schema query per statement.

SQL runs in the server's locked-down sandbox duckdb (flight_server/domain/sql/) on both server paths; the
plain path reads every endpoint of its GetFlightInfo, in order (signed tickets, never built by hand).
Figures: benchmarks/README.md ("Flight SQL").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flight_server.testing.servers import ServerProcess  # noqa: E402

PROJECT = """\
format_version: 1
project: {name: bench}
destinations:
  store: {type: duckdb, location: _data/bench.duckdb}
datasets:
  bench_dataset: {destination: [store]}
profiles:
  reader:
    datasets:
      bench_dataset: {write: false}
server: {profile: reader, sql_max_rows: 100000000}
"""
QUERY = "SELECT * FROM numbers"

BARE_SERVER = textwrap.dedent("""
    import sys
    import pyarrow as pa, pyarrow.flight as flight
    table = pa.ipc.open_file(pa.memory_map(sys.argv[1])).read_all().combine_chunks()
    batches = table.to_batches(max_chunksize=122_880)
    class Bare(flight.FlightServerBase):
        def do_get(self, context, ticket):
            return flight.RecordBatchStream(pa.Table.from_batches(batches, table.schema))
    server = Bare("grpc://127.0.0.1:0")
    print(server.port, flush=True)
    server.serve()
""")


def make_data(rows: int) -> pa.Table:
    import numpy as np

    rng = np.random.default_rng(7)
    return pa.table({
        "id": pa.array(np.arange(rows, dtype=np.int64)),
        "value": pa.array(rng.random(rows)),
        "bucket": pa.array(rng.integers(0, 1000, rows, dtype=np.int32)),
        "ts": pa.array(np.arange(rows, dtype="int64") * 1_000_000, pa.timestamp("us", tz="UTC")),
    })


def load(folder: Path, data: pa.Table) -> Path:
    """Write the project file and load ``data`` into its dataset with a dlt pipeline."""
    import dlt

    from flight_server.domain.config import load_project
    from flight_server.storage import open_storage

    project_file = folder / "dlt.yml"
    project_file.write_text(PROJECT)
    project = load_project(project_file)
    storage = open_storage(project, project.datasets["bench_dataset"])
    pipeline = dlt.pipeline("bench_load", pipelines_dir=str(folder / "pipelines"),
                            destination=storage.dlt_destination(), dataset_name="bench_dataset")
    pipeline.run(data.to_batches(max_chunksize=1_000_000), table_name="numbers")
    storage.close()
    return project_file


def best(repeat: int, read: Callable[[], pa.Table]) -> tuple[float, int, int]:
    times, rows, nbytes = [], 0, 0
    for _ in range(repeat):
        start = time.perf_counter()
        table = read()
        times.append(time.perf_counter() - start)
        rows, nbytes = table.num_rows, table.nbytes
        del table
    return min(times), rows, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--load-into", type=Path, help=argparse.SUPPRESS)  # the loading subprocess
    args = parser.parse_args()
    if args.load_into:
        load(args.load_into, make_data(args.rows))
        return

    import adbc_driver_flightsql.dbapi as flight_sql

    with tempfile.TemporaryDirectory(prefix="flight-sql-bench-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        # load in another process: duckdb keeps a file lock while the loading process lives
        subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--load-into", str(folder)], check=True)
        project_file = folder / "dlt.yml"
        print(f"loaded {args.rows:,} rows with dlt in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        results: dict[str, tuple[float, int, int]] = {}
        with ServerProcess(project_file) as server:
            client = flight.connect(server.url)
            command = json.dumps({"v": 1, "op": "sql", "dataset": "bench_dataset", "query": QUERY}).encode()

            def plain() -> pa.Table:
                # signed tickets: always GetFlightInfo, then every endpoint it returns, in order
                info = client.get_flight_info(flight.FlightDescriptor.for_command(command))
                parts = [client.do_get(endpoint.ticket).read_all() for endpoint in info.endpoints]
                return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

            with flight_sql.connect(server.url, autocommit=True) as conn:
                def adbc() -> pa.Table:
                    with conn.cursor() as cur:
                        cur.execute(f"SELECT * FROM bench_dataset.{QUERY.split()[-1]}")
                        return cur.fetch_arrow_table()

                table = plain()
                ipc_file = folder / "table.arrow"
                with pa.OSFile(str(ipc_file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)
                del table
                results["Flight SQL (ADBC Go driver)"] = best(args.repeat, adbc)
                results["plain DoGet (sql command)"] = best(args.repeat, plain)
            client.close()
        bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(ipc_file)], stdout=subprocess.PIPE, text=True)
        try:
            port = int(bare.stdout.readline())  # type: ignore[union-attr]
            bare_client = flight.connect(f"grpc://127.0.0.1:{port}")
            results["bare pyarrow server (memory)"] = best(
                args.repeat, lambda: bare_client.do_get(flight.Ticket(b"t")).read_all())
            bare_client.close()
        finally:
            bare.terminate()
            bare.wait(10)

    ceiling = results["bare pyarrow server (memory)"][0]
    plain_time = results["plain DoGet (sql command)"][0]
    print(f"{'path':32} {'rows':>12} {'MB':>8} {'best s':>8} {'GB/s':>6} {'vs plain':>9} {'vs bare':>8}")
    for name, (seconds, rows, nbytes) in results.items():
        print(f"{name:32} {rows:>12,} {nbytes / 1e6:>8.0f} {seconds:>8.3f} {nbytes / seconds / 1e9:>6.2f} "
              f"{plain_time / seconds:>9.2f} {ceiling / seconds:>8.2f}")
    overhead = results["Flight SQL (ADBC Go driver)"][0] / plain_time - 1
    verdict = "within" if overhead <= 0.10 else "NOT within"
    print(f"Flight SQL takes {overhead:+.1%} vs plain DoGet: {verdict} the 10% target")


if __name__ == "__main__":
    main()
