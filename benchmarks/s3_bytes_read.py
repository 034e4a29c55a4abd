"""Bytes read from S3 by selective SQL over a big Delta table (issue 14, "Scale").

    python benchmarks/s3_bytes_read.py [--rows 50000000] [--output benchmarks/results/s3_bytes_read.json]

One run, loopback only:

1. The table ``t`` of ``benchmarks/sql_latency.py`` (``--rows`` rows, ids in order) is loaded by a real dlt
   pipeline into a Delta table on the S3 test server (moto, ``S3Server``), in loads of ``--rows-per-load``
   rows (each a Delta commit with its own Parquet file).
2. ``flight-share serve`` reads the bucket through a counting HTTP proxy (this process): every byte of every
   answer the S3 server sends to the server passes through it, per request (method, path, bytes).
3. Each query runs through the ADBC Flight SQL driver with the counters reset before it; reported: the bytes
   the server read from S3 (answer bodies) and how many requests, against the table's total Parquet bytes
   (from the Delta log), the rows of the answer and the time. The hot-table cache is off
   (``server.cache_bytes: 0``): every query reads S3.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import adbc_driver_flightsql.dbapi as flight_sql  # noqa: E402
import pyarrow as pa  # noqa: E402
from sql_latency import LOADER, STORES, dataset_of, make_table  # noqa: E402

from flight_server.testing.servers import ServerProcess  # noqa: E402
from flight_server.testing.services import S3Server  # noqa: E402

KIND = "delta_s3"
QUERIES = {
    "point": "SELECT * FROM t WHERE id = {point}",
    "range": "SELECT id, value FROM t WHERE id BETWEEN {low} AND {high}",
    "limit": "SELECT id, name FROM t LIMIT 10",
    "group_filtered": "SELECT name, count(*) AS n FROM t WHERE id < {low} GROUP BY name ORDER BY n DESC LIMIT 10",
    "scan_column": "SELECT sum(value) AS s FROM t",
}


class Counter:
    """What the S3 server answered, per request, since the last reset."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, int]] = []

    def add(self, method: str, path: str, nbytes: int) -> None:
        with self.lock:
            self.requests.append((method, path, nbytes))

    def take(self) -> list[tuple[str, str, int]]:
        with self.lock:
            taken, self.requests = self.requests, []
        return taken


def counting_proxy(upstream_port: int, counter: Counter) -> ThreadingHTTPServer:
    """A plain HTTP forwarder to the S3 server that counts answer bytes (moto does not check signatures
    against the Host header, so requests pass unchanged)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=300)
            try:
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                answer = conn.getresponse()
                data = answer.read()
            finally:
                conn.close()
            counter.add(self.command, self.path, len(data))
            self.send_response(answer.status, answer.reason)
            for key, value in answer.getheaders():
                # a HEAD's Content-Length is the object's size: passed on as the S3 server said it
                if key.lower() not in ("transfer-encoding", "connection") and \
                        (key.lower() != "content-length" or self.command == "HEAD"):
                    self.send_header(key, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_queries(conn: Any, counter: Counter, results: dict[str, Any], rows: int, table_bytes: int, files: int) -> None:
    """Each query once to warm (the table's log), then once counted."""
    point, low = rows * 3 // 4 + 4242, rows // 2
    for name, template in QUERIES.items():
        sql = template.format(point=point, low=low, high=low + 100_000)
        qualified = sql.replace("FROM t", f"FROM {dataset_of(KIND)}.t")
        with conn.cursor() as cur:
            cur.execute(qualified)
            cur.fetch_arrow_table()
        counter.take()
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            cur.execute(qualified)
            answer = cur.fetch_arrow_table()
        seconds = time.perf_counter() - t0
        requests = counter.take()
        read = sum(n for method, _, n in requests if method == "GET")
        results["queries"][name] = {
            "sql": sql, "answer_rows": answer.num_rows, "ms": round(seconds * 1e3, 1),
            "bytes_read": read, "share_of_table": round(read / table_bytes, 5),
            "get_requests": sum(1 for m, _, _ in requests if m == "GET"),
            "other_requests": sum(1 for m, _, _ in requests if m != "GET"),
        }
        print(f"{name:15s} {answer.num_rows:>10,} rows {seconds * 1e3:8.1f} ms  read {read:>13,} B "
              f"= {100 * read / table_bytes:6.2f} % of {table_bytes:,} B in {files} files", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--rows-per-load", type=int, default=5_000_000)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "s3_bytes_read.json"))
    args = parser.parse_args(argv)

    import subprocess

    s3 = S3Server().start()
    folder = Path(tempfile.mkdtemp(prefix="flight_share_s3_bytes_"))
    try:
        project = folder / "dlt.yml"
        project.write_text(
            "format_version: 1\nproject: {name: s3_bytes}\ndestinations:\n" + STORES[KIND]
            + f"datasets:\n  {dataset_of(KIND)}: {{destination: [s3lake]}}\n"
            + f"profiles:\n  access:\n    datasets:\n      {dataset_of(KIND)}: {{}}\n"
            + f"server: {{profile: access, sql_max_rows: {args.rows + 1}, cache_bytes: 0}}\n")
        env = dict(s3.env)
        started = time.perf_counter()
        for first in range(0, args.rows, args.rows_per_load):
            part = make_table(min(args.rows_per_load, args.rows - first))
            part = part.set_column(0, "id", pa.array(range(first, first + part.num_rows), pa.int64()))
            data_file = folder / "part.arrow"
            with pa.OSFile(str(data_file), "wb") as sink, pa.ipc.new_file(sink, part.schema) as writer:
                writer.write_table(part)
            loader = LOADER.replace('write_disposition="replace"', 'write_disposition="append"')
            result = subprocess.run([sys.executable, "-c", loader, str(REPO), str(project), str(data_file), dataset_of(KIND)],
                                    capture_output=True, text=True, env={**os.environ, **env}, cwd=REPO)
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-3000:])
        load_seconds = time.perf_counter() - started
        print(f"loaded {args.rows:,} rows in {load_seconds:.0f} s", flush=True)

        from deltalake import DeltaTable

        uri = f"s3://{s3.bucket}/lake/{dataset_of(KIND)}/t"
        options = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                   "AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_REGION": s3.region, "AWS_ALLOW_HTTP": "true"}
        actions = pa.table(DeltaTable(uri, storage_options=options).get_add_actions(flatten=True))
        table_bytes, files = int(sum(actions.column("size_bytes").to_pylist())), actions.num_rows

        counter = Counter()
        proxy = counting_proxy(s3.port, counter)
        server_env = {**env, "S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}"}
        results: dict[str, Any] = {"rows": args.rows, "files": files, "table_parquet_bytes": table_bytes,
                                   "load_seconds": round(load_seconds, 1), "queries": {}}
        with ServerProcess(project, env=server_env) as server:
            conn = flight_sql.connect(server.url, autocommit=True)
            try:
                run_queries(conn, counter, results, args.rows, table_bytes, files)
            except Exception:
                print(server.output()[-5000:])
                raise
            finally:
                conn.close()
        proxy.shutdown()
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {args.output}")
    finally:
        s3.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
