"""Start real flight-share servers as separate processes on free loopback ports."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Iterator

REPO = Path(__file__).resolve().parents[2]  # the checkout: the folder holding flight_server/
_READY = re.compile(r"serving project \S+ on (grpc(?:\+tls)?)://[^:]+:(\d+)")


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``flight-share ARGS`` in a subprocess (the real entry point)."""
    result = subprocess.run(
        [sys.executable, "-m", "flight_server.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"flight-share {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


_CACHE: Path | None = None


def _cache_root() -> Path:
    """This process's cache of loaded project folders, removed when the process ends (under pytest-xdist
    every worker is its own process and so has its own cache: no locks, no sharing between workers)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = Path(tempfile.mkdtemp(prefix="flight_share_projects_"))
        atexit.register(shutil.rmtree, _CACHE, True)
    return _CACHE


def make_project(folder: Path, source: Path = REPO / "configs" / "demo" / "dlt.yml", events: int = 500) -> Path:
    """Copy a project file into ``folder`` and load the demo events into it.

    The demo load (a dlt pipeline run in a subprocess, ~4 s) runs once per process for each (project file,
    events) pair; every caller gets its own copy of that loaded folder, so a test may change its copy
    freely. The demo's generator is seeded and its pipeline state lives outside the project folder, so a
    copy holds what a fresh load would (the load ids of the cached run)."""
    folder.mkdir(parents=True, exist_ok=True)
    project = folder / "dlt.yml"
    if not events:
        shutil.copy(source, project)
        return project
    key = hashlib.sha256(Path(source).read_bytes() + f"\0{events}".encode()).hexdigest()[:16]
    cached = _cache_root() / key
    if not cached.exists():
        building = _cache_root() / f"{key}.building"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir()
        shutil.copy(source, building / "dlt.yml")
        cli("demo", "--project", str(building / "dlt.yml"), "--events", str(events))
        building.rename(cached)
    shutil.copytree(cached, folder, dirs_exist_ok=True)
    return project


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Set environment variables for a block (in this process: dlt and project files read them)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a child process, killing it if it does not end within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class ServerProcess:
    """``flight-share serve`` on a free loopback port; stop() or use as a context manager."""

    def __init__(self, project: Path, *extra: str, env: dict[str, str] | None = None, port: int = 0) -> None:
        self.project = project
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flight_server.cli", "serve", "--project", str(project), "--host", "127.0.0.1",
             "--port", str(port), *extra],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.scheme = "grpc"
        self.port = self._wait_ready()
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"

    def _drain(self, stream: IO[str]) -> None:
        for line in stream:
            self.log.append(line)

    def _wait_ready(self, timeout: float = 60) -> int:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    time.sleep(0.2)
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{''.join(self.log)}")
                continue
            self.log.append(line)
            m = _READY.search(line)
            if m:
                threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True).start()
                self.scheme = m.group(1)
                return int(m.group(2))
        raise RuntimeError(f"server not ready within {timeout}s:\n{''.join(self.log)}")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return "".join(self.log)

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InProcessServer:
    """A flight-share server in this process, on a free loopback port: for fast unit tests of the
    dispatch and the error mapping (no process start; the same code path as ``serve``)."""

    def __init__(self, project: Path, profile: str | None = None) -> None:
        from flight_server.domain.config import load_project
        from flight_server.transport.server import FlightShareServer

        self.server = FlightShareServer(load_project(project), "grpc://127.0.0.1:0", profile=profile)
        self.url = f"grpc://127.0.0.1:{self.server.port}"
        self._thread = threading.Thread(target=self.server.serve, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self._thread.join(10)

    def __enter__(self) -> "InProcessServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
