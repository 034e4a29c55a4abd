"""Real backing services for the destination tests: PostgreSQL and an S3-compatible server (moto).

Both run as separate processes on free loopback ports for the whole test session and are stopped at
its end. Nothing is skipped: a missing PostgreSQL installation fails with a message saying what to
install (``.ci/run`` installs it on a fresh Debian machine).
"""

from __future__ import annotations

import copy
import glob
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


_WORKER_PORTS = 1000  # ports per pytest-xdist worker, from 20000 up: below Linux's ephemeral range (32768-)
_next_port = 0


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1.

    Under pytest-xdist (``PYTEST_XDIST_WORKER=gwN``) each worker takes its ports from a range of its own
    below the kernel's ephemeral range: another worker's free_port() never returns the same port between
    this check and the bind of the server it is for, and no port-0 bind (a Flight server's) takes it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not worker[2:].isdigit():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    global _next_port
    base = 20000 + int(worker[2:]) * _WORKER_PORTS
    for _ in range(_WORKER_PORTS):
        port = base + _next_port % _WORKER_PORTS
        _next_port += 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}-{base + _WORKER_PORTS - 1} for pytest-xdist worker {worker}")


def _wait(check, what: str, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        time.sleep(0.2)
    detail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not become ready within {timeout}s (last error: {last})\n{detail}")


# --- PostgreSQL -------------------------------------------------------------------------------------
def postgres_bin_dir() -> Path:
    """The newest Debian PostgreSQL bin folder (initdb, pg_ctl); a clear failure when there is none."""
    found = sorted(
        (Path(p) for p in glob.glob(PG_BIN_GLOB) if (Path(p) / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        on_path = shutil.which("initdb")
        if on_path:
            return Path(on_path).parent
        raise RuntimeError(
            f"PostgreSQL server binaries not found (no {PG_BIN_GLOB}/initdb and no initdb on PATH); "
            "install them with: apt-get update && apt-get install -y postgresql"
        )
    return found[-1]


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster: loopback only, a free port, password auth over TCP."""

    host: str = "127.0.0.1"
    port: int = 0
    user: str = "loader"
    password: str = field(default_factory=lambda: "pw-" + secrets.token_hex(12))
    database: str = "dlt_data"
    root: Path | None = None

    def __post_init__(self) -> None:
        self.bin = postgres_bin_dir()
        self.port = self.port or free_port()
        # pytest's tmp folders are 0700 root-owned; the postgres user needs its own reachable folder
        self.root = Path(tempfile.mkdtemp(prefix="flight_share_pg_"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "postgres.log"
        self._as_root = os.geteuid() == 0

    # running the server binaries: never as root (postgres refuses), so as the postgres user
    def _run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def start(self) -> PostgresServer:
        assert self.root is not None
        self.data.mkdir()
        self.sock.mkdir()
        os.chmod(self.root, 0o755)
        if self._as_root:
            shutil.chown(self.root, "postgres")
            for p in (self.data, self.sock):
                shutil.chown(p, "postgres")
        # local (socket) connections trusted for setup; TCP needs the password
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8")
        options = f"-c listen_addresses={self.host} -p {self.port} -k {self.sock} -c fsync=off -c full_page_writes=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        _wait(self._accepts_admin, "PostgreSQL", 60, self.log)
        self._admin(
            f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'",
            f"CREATE DATABASE {self.database} OWNER {self.user}",
        )
        return self

    def database_named(self, name: str) -> PostgresServer:
        """The same server seen through a database of its own (created, owned by the same user), so tests
        sharing this server (one per test worker) cannot see each other's datasets."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"not a plain PostgreSQL database name: {name!r}")
        con = self._admin_connect()
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE DATABASE {name} OWNER {self.user}")
        finally:
            con.close()
        other = copy.copy(self)
        other.database = name
        return other

    def _admin_connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=str(self.sock), port=self.port, user="postgres", dbname=database)

    def _accepts_admin(self) -> bool:
        self._admin_connect().close()
        return True

    def _admin(self, *statements: str) -> None:
        con = self._admin_connect()
        try:
            con.autocommit = True
            with con.cursor() as cur:
                for s in statements:
                    cur.execute(s)
        finally:
            con.close()

    @property
    def url(self) -> str:
        """Connection string with the password (for dlt / ADBC; never print it)."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    @property
    def env(self) -> dict[str, str]:
        """What a project file reads through ``{env.NAME}``."""
        return {"PG_HOST": self.host, "PG_PORT": str(self.port), "PG_USER": self.user,
                "PG_PASSWORD": self.password, "PG_DATABASE": self.database}

    def stop(self) -> None:
        if self.data.exists() and (self.data / "postmaster.pid").exists():
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except RuntimeError:
                pass
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


# --- S3 (moto server mode) --------------------------------------------------------------------------
@dataclass
class S3Server:
    """``moto_server`` on a free loopback port, with one bucket created."""

    host: str = "127.0.0.1"
    port: int = 0
    bucket: str = "flight-share-test"
    region: str = "us-east-1"
    access_key: str = "AKIA" + secrets.token_hex(8).upper()
    secret_key: str = "secret-" + secrets.token_hex(16)

    def start(self) -> S3Server:
        self.port = self.port or free_port()
        self.log = Path(tempfile.mkstemp(prefix="flight_share_moto_", suffix=".log")[1])
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdout=self._log_file, stderr=subprocess.STDOUT,
        )

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=2).close()
            except urllib.error.HTTPError:
                pass  # any HTTP answer means the server is up
            return True

        _wait(up, "moto S3 server", 60, self.log)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)

    @property
    def credentials(self) -> dict[str, str]:
        """dlt's filesystem credentials for this server."""
        return {"aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key,
                "endpoint_url": self.endpoint_url, "region_name": self.region}

    @property
    def env(self) -> dict[str, str]:
        """What a project file reads through ``{env.NAME}``."""
        return {"S3_BUCKET": self.bucket, "S3_ENDPOINT_URL": self.endpoint_url, "S3_REGION": self.region,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def stop(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None:
            from flight_server.testing.servers import stop_process

            stop_process(proc)
        if getattr(self, "_log_file", None) is not None:
            self._log_file.close()
            self.log.unlink(missing_ok=True)


def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    try:
        yield server.start()
    finally:
        server.stop()
