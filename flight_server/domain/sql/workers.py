"""The sandbox's second wall: warm, killable worker processes, shared fairly by user.

No query runs in the server process: duckdb folds constant expressions while it binds and plans
(``range(1e8)``, ``repeat(...)``), outside its ``memory_limit`` and before ``interrupt()`` can act, and a
single scalar call (``levenshtein`` of long strings) never looks at interrupts. So each query -- its bind
for GetFlightInfo / GetSchema as much as its run for DoGet -- goes to a worker process
(:mod:`flight_server.domain.sql_worker`) from a warm pool: duckdb already imported, an OS memory limit
(``RLIMIT_DATA``: ``server.sql_memory_limit`` plus a fixed margin), an empty environment, no files. The
server can end a worker at any moment (SIGKILL: whatever phase it is in) and a fresh one replaces it.

At most :data:`SANDBOX_WORKERS` queries run at once; one user holds at most ``server.sql_per_user``
workers (:mod:`flight_server.domain.fair`, issue 22); waiting queries are served round-robin by user and
wait at most ``server.sql_timeout``, then are refused "busy" (UNAVAILABLE), never "exceeded the time limit".
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

from flight_server.domain.errors import Unavailable
from flight_server.domain.fair import FairShare
from flight_server.domain.sql_worker import recv_frame

#: queries that run at once, each in its own worker process (more wait for a free one); the server's memory
#: for SQL is bounded by this many times server.sql_memory_limit
SANDBOX_WORKERS = 4
#: the default of server.sql_per_user: the workers one user may hold at once (issue 22: one user's four slow
#: queries held every worker, and everyone else's ``SELECT 1`` failed); the others stay for other users
SQL_PER_USER = -(-SANDBOX_WORKERS // 2)
#: a user's queries that may wait for a worker at once (each holds a server thread); more are refused "busy"
SQL_WAITING_PER_USER = 8
#: idle workers kept started (duckdb imported) so a query does not wait for a process to start; a worker
#: whose query ended cleanly goes back to the idle ones (at most SANDBOX_WORKERS of them)
WARM_WORKERS = 2
#: a worker is replaced after this many queries (each query runs in its own transaction, rolled back;
#: this only bounds drift)
MAX_QUERIES_PER_WORKER = 500
#: a worker that holds more than this after its query (allocators keep freed memory) is replaced, so idle
#: workers hold little: the server's SQL memory stays within SANDBOX_WORKERS x (limit + margin + this)
IDLE_WORKER_RSS = 256 << 20
# the worker's side is a module outside this package: importing it must not import the server's SQL checks
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); from flight_server.domain.sql_worker import main; "
         "main(sys.argv[2:])")
_ROOT = str(Path(__file__).resolve().parents[3])  # the folder that holds flight_server/

log = logging.getLogger("flight_share.server")
_POOLS: dict[tuple[int, int, int], WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


class Feeder(Protocol):
    """The query a worker runs, as the worker's thread sees it: it streams table ``index`` into ``fd``."""

    def feed(self, index: int, fd: int) -> None: ...


class _Spawner:
    """Starts every worker from one thread that lives as long as the server process.

    Workers ask the kernel for SIGKILL when their parent goes (``PR_SET_PDEATHSIG``), and Linux sends
    it when the *thread* that forked them ends: a worker forked by a short-lived thread would die
    with that thread.
    """

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[list[str], int, Future[subprocess.Popen[bytes]]]] = queue.Queue()
        threading.Thread(target=self._run, name="sql-worker-spawner", daemon=True).start()

    def _run(self) -> None:
        while True:
            args, fd, answer = self._requests.get()
            try:
                answer.set_result(subprocess.Popen(
                    args, pass_fds=[fd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, cwd="/", env={"PATH": os.defpath, "LANG": "C.UTF-8"}))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                answer.set_exception(exc)

    def popen(self, args: list[str], fd: int) -> subprocess.Popen[bytes]:
        answer: Future[subprocess.Popen[bytes]] = Future()
        self._requests.put((args, fd, answer))
        return answer.result()


_SPAWNER: _Spawner | None = None


def _spawner() -> _Spawner:
    global _SPAWNER
    with _POOLS_LOCK:
        if _SPAWNER is None:
            _SPAWNER = _Spawner()
        return _SPAWNER


class Worker:
    """One sandbox worker process and the thread that serves its requests for table data."""

    def __init__(self, memory_bytes: int, threads: int) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.proc = _spawner().popen(
                [sys.executable, "-c", _BOOT, _ROOT, str(theirs.fileno()), str(memory_bytes), str(threads)],
                theirs.fileno())
        finally:
            theirs.close()
        self.sock = ours
        self.ready = threading.Event()
        self.dead = False
        self.was_ready = False
        self.queries = 0
        self.job: Feeder | None = None
        self.user: str | None = None  # whose query holds it (its pool slot is that user's)
        threading.Thread(target=self._serve, name=f"sql-worker-{self.proc.pid}", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _serve(self) -> None:
        try:
            while True:
                message, fds = recv_frame(self.sock)
                if "ready" in message:
                    self.was_ready = True
                    self.ready.set()
                    continue
                job = self.job
                if "open" in message and fds and job is not None:
                    threading.Thread(target=job.feed, args=(int(message["open"]), fds[0]), daemon=True).start()
                    fds = fds[1:]
                for fd in fds:
                    os.close(fd)
        except (EOFError, OSError, ValueError):
            pass
        finally:
            self.dead = True
            self.ready.set()
            self.kill()
            code = self.proc.wait()
            self.sock.close()
            if not self.was_ready:
                log.error("a SQL sandbox worker exited before it was ready (%s)", exit_text(code))

    def kill(self) -> None:
        """End the process now (whatever it is doing: binding, planning, executing, streaming)."""
        self.dead = True
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class WorkerPool:
    """Warm sandbox workers: at most :data:`SANDBOX_WORKERS` busy, :data:`WARM_WORKERS` kept idle.

    The busy ones are shared fairly (:class:`~flight_server.domain.fair.FairShare`): one user holds at most
    ``per_user`` at once, and a freed worker goes to the next user in turn, not to the user with most
    queries waiting."""

    def __init__(self, memory_bytes: int, threads: int, size: int = SANDBOX_WORKERS, warm: int = WARM_WORKERS,
                 per_user: int = SQL_PER_USER) -> None:
        self.memory_bytes, self.threads, self.warm = memory_bytes, threads, warm
        self._slots = FairShare(size, per_user, SQL_WAITING_PER_USER, "SQL query", "server.sql_per_user",
                                "SQL queries", lend_idle=True)
        self._lock = threading.Lock()
        self._idle: list[Worker] = []
        self._starting = 0
        self.closed = False

    def fill(self) -> None:
        """Start workers in the background until :data:`WARM_WORKERS` are idle or starting."""
        with self._lock:
            missing = self.warm - len(self._idle) - self._starting
            self._starting += max(missing, 0)
        for _ in range(max(missing, 0)):
            threading.Thread(target=self._start_one, daemon=True).start()

    def _start_one(self) -> None:
        worker = None
        try:
            worker = Worker(self.memory_bytes, self.threads)
            worker.ready.wait(60)
        except OSError:
            log.exception("could not start a SQL sandbox worker")
        finally:
            with self._lock:
                self._starting -= 1
                if worker is not None and not worker.dead and worker.ready.is_set() and not self.closed:
                    self._idle.append(worker)
                    worker = None
            if worker is not None:
                worker.kill()

    def stats(self) -> dict[str, int]:
        """Queries running in a worker, queries waiting for one, users doing either."""
        return self._slots.stats()

    def acquire(self, user: str, wait: float, cancelled: Callable[[], bool] | None = None,
                dataset: str | None = None) -> Worker:
        """A ready worker for one query of ``user``, after waiting at most ``wait`` s for a free one (and for
        it to start); the wait is not the query's time: its clock starts once it has the worker."""
        self._slots.acquire(user, wait, cancelled, dataset)
        deadline = time.monotonic() + wait
        try:
            for _attempt in range(3):  # an idle worker may have died since (the kernel, a crash): take another
                worker = self._take_idle() or Worker(self.memory_bytes, self.threads)  # none warm: start one
                self.fill()
                if not worker.ready.wait(max(deadline - time.monotonic(), 0)):
                    worker.kill()
                    raise Unavailable(f"busy: no SQL sandbox process could be started within {wait:g} s; retry",
                                      dataset=dataset)
                if not worker.dead:
                    worker.user = user
                    return worker
            raise Unavailable("the SQL sandbox could not start; see the server log")
        except BaseException:
            self._slots.release(user)
            raise

    def _take_idle(self) -> Worker | None:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if not worker.dead:
                    return worker
                worker.kill()
        return None

    def release(self, worker: Worker, reuse: bool) -> None:
        worker.job = None
        user, worker.user = worker.user, None
        worker.queries += 1
        keep = reuse and not worker.dead and not self.closed and worker.queries < MAX_QUERIES_PER_WORKER \
            and _rss(worker.pid) <= IDLE_WORKER_RSS
        if keep:
            with self._lock:
                keep = len(self._idle) < SANDBOX_WORKERS
                if keep:
                    self._idle.append(worker)
        if not keep:
            worker.kill()
        if user is not None:
            self._slots.release(user)
        if not keep and not self.closed:
            self.fill()

    def close(self) -> None:
        self.closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()


def shared_pool(memory_bytes: int, threads: int, per_user: int = SQL_PER_USER) -> WorkerPool:
    """One pool per limit per process (tests make many sandboxes with the same settings)."""
    with _POOLS_LOCK:
        pool = _POOLS.get((memory_bytes, threads, per_user))
        if pool is None or pool.closed:
            pool = _POOLS[(memory_bytes, threads, per_user)] = WorkerPool(memory_bytes, threads, per_user=per_user)
        return pool


def _rss(pid: int) -> int:
    """Resident memory of a process (Linux ``/proc``); huge when unknown, so the worker is not kept."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 1 << 62


def exit_text(code: int | None) -> str:
    """How a worker process ended: ``signal SIGKILL`` or ``exit code 1``."""
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
