"""Start real flight-share servers as separate processes on free loopback ports."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from flight_server.domain.save_journal import SAVES
from flight_server.domain.workdir import LOCK

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


def save_folders_left(project: Path) -> list[str]:
    """What saves left in the server processes' puts folders (``<project>/.flight-share/puts/<process>/``,
    domain/workdir.py) - pending packages would live there; the saves' journal beside them
    (domain/save_journal.py) holds answers for retries, not packages, and the lock files are the processes'."""
    root = project.parent / ".flight-share" / "puts"
    if not root.exists():
        return []
    return sorted(p.name for d in root.iterdir() if d.is_dir() and d.name != SAVES for p in d.iterdir() if p.name != LOCK)


class ServerProcess:
    """``flight-share serve`` on a free loopback port; stop() or use as a context manager.

    The server's stdout and stderr are read by one thread each into :attr:`log` (lines, in arrival
    order). :meth:`settled_output` is the barrier a test uses instead of sleeping before it reads the
    log: everything the server had written when it was called is in the answer."""

    def __init__(self, project: Path, *extra: str, env: dict[str, str] | None = None, port: int = 0) -> None:
        self.project = project
        self.log: list[str] = []
        self._changed = threading.Condition()
        self._waiting: dict[int, bool] = {}  # per stream: its reader is blocked on an empty pipe
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flight_server.cli", "serve", "--project", str(project), "--host", "127.0.0.1",
             "--port", str(port), *extra],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._streams = (self.proc.stdout, self.proc.stderr)
        self._readers = [threading.Thread(target=self._drain, args=(stream,), daemon=True) for stream in self._streams]
        for reader in self._readers:
            reader.start()
        self.scheme = "grpc"
        self.port = self._wait_ready()
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"

    def _drain(self, stream: IO[bytes]) -> None:
        fd = stream.fileno()
        pending = b""
        while True:
            with self._changed:
                self._waiting[fd] = True
                self._changed.notify_all()
            chunk = os.read(fd, 65536)
            with self._changed:
                self._waiting[fd] = False
                pending += chunk
                *lines, pending = pending.split(b"\n")
                self.log.extend(line.decode(errors="replace") + "\n" for line in lines)
                if not chunk:  # end of file: the server has exited
                    if pending:
                        self.log.append(pending.decode(errors="replace"))
                    self._waiting[fd] = True
                    self._changed.notify_all()
                    return
                self._changed.notify_all()

    def _wait_ready(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.log[seen:]:
                    m = _READY.search(line)
                    if m:
                        self.scheme = m.group(1)
                        return int(m.group(2))
                seen = len(self.log)
                if self.proc.poll() is not None and all(not r.is_alive() for r in self._readers):
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{''.join(self.log)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"server not ready within {timeout}s:\n{''.join(self.log)}")
                self._changed.wait(min(left, 1.0))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return "".join(self.log)

    def settled_output(self, timeout: float = 30) -> str:
        """The log once everything the server has written so far has been read: both pipes empty and
        both readers waiting for more (or at end of file)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not all(self._waiting.get(s.fileno()) and _unread(s) == 0 for s in self._streams):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"the server's output did not settle within {timeout}s")
                self._changed.wait(min(left, 0.05))
            return "".join(self.log)

    def stop(self) -> None:
        stop_process(self.proc)
        for reader in self._readers:  # the pipes are at end of file: every line the server wrote is in the log
            reader.join(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _unread(stream: IO[bytes]) -> int:
    """Bytes waiting in a pipe (FIONREAD); 0 once it is closed."""
    try:
        return struct.unpack("i", fcntl.ioctl(stream.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 30, every: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy (returned) or fail after ``timeout`` seconds:
    the tests' way to wait for another process (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(every)


class InProcessServer:
    """A flight-share server in this process, on a free loopback port: for fast unit tests of the
    dispatch and the error mapping (no process start; the same code path as ``serve``)."""

    def __init__(self, project: Path, profile: str | None = None) -> None:
        from flight_server.domain.config import load_project
        from flight_server.storage import open_storage
        from flight_server.transport.server import FlightShareServer

        self.server = FlightShareServer(load_project(project), "grpc://127.0.0.1:0", open_storage, profile=profile)
        self.url = f"grpc://127.0.0.1:{self.server.port}"
        self._thread = threading.Thread(target=self.server.serve, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self._thread.join(10)

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
