"""A sandbox worker process: runs one checked SQL query at a time for :mod:`flight_server.domain.sql`.

The server keeps a small pool of these warm (duckdb and pyarrow already imported). Each one runs
under an operating-system memory limit (``RLIMIT_DATA``: heap and private mappings, which is where
duckdb and Arrow allocate) and can be killed at any moment: duckdb folds constant expressions while
it binds and plans a query, outside its own ``memory_limit`` and before ``interrupt()`` can act, and
one scalar call (``levenshtein`` of two long strings) never checks for interrupts at all. The server
therefore owns the deadline and the cancellation and simply ends this process (SIGKILL).

Protocol, over one Unix stream socket inherited from the server (frames: 4-byte big-endian length
+ JSON, file descriptors passed with ``SCM_RIGHTS``):

- worker -> server ``{"ready": pid}`` once, when the worker can take queries;
- server -> worker ``{"op": "schema" | "run", "sql", "dataset", "tables": [[name, schema]], "parameters", ...}``
  with the write end of a fresh pipe for the result; ``parameters`` (optional) is an Arrow IPC stream
  (base64) of bound values, one row per execution: duckdb binds them (they never become SQL text), and
  a ``run`` streams the results of every row one after the other (a ``schema`` binds the first row);
- worker -> server ``{"open": i}`` with the write end of a fresh pipe, each time duckdb starts
  scanning table ``i``: the server streams that table's Arrow data (already projected to the
  columns the query uses) into it as an Arrow IPC stream. Nothing is materialised on either side.

The result pipe carries one Arrow IPC stream: the result schema, the result batches, then one
0-row batch whose custom metadata says how the query ended: ``{"flight_share": "end"}`` or
``{"flight_share": "error", "kind": ..., "message": ...}``. A stream that ends without that batch
means the worker died (killed by the server, or by the kernel).

It imports only :mod:`flight_server.domain.identifiers` from the server (which imports nothing), so it starts
fast, and it holds no secret: the server passes it an empty environment. It sits beside the
:mod:`flight_server.domain.sql` package, not in it: importing a module of a package first runs the package's
``__init__`` (the parser and the checks).
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import resource
import signal
import socket
import struct
import sys
import threading
from typing import Any

from flight_server.domain.identifiers import quote

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20
END = "end"
ERROR = "error"
MARK = "flight_share"


# --- framing and pipes (used by both sides) ---------------------------------------------------------

def pipe() -> tuple[int, int]:
    """A pipe with a 1 MiB buffer (Linux default 64 KiB): Arrow data crosses in far fewer context switches."""
    r, w = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (OSError, ImportError):  # pragma: no cover - over /proc/sys/fs/pipe-max-size, or not Linux
        pass
    return r, w


def send_frame(sock: socket.socket, message: dict[str, Any], fds: list[int] = ()) -> None:  # type: ignore[assignment]
    data = json.dumps(message).encode()
    frame = _HEADER.pack(len(data)) + data
    sent = socket.send_fds(sock, [frame], list(fds)) if fds else sock.send(frame)
    if sent < len(frame):
        sock.sendall(frame[sent:])


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("sandbox channel closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One frame and the descriptors that came with it (EOFError when the other side is gone)."""
    head, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, 4)
    if not head:
        for fd in fds:
            os.close(fd)
        raise EOFError("sandbox channel closed")
    if len(head) < _HEADER.size:
        head += _recv_exactly(sock, _HEADER.size - len(head))
    (size,) = _HEADER.unpack(head)
    if size > MAX_FRAME:
        raise EOFError("sandbox frame too large")
    return json.loads(_recv_exactly(sock, size)), fds


# --- the worker ---------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """SIGKILL this process when the server process ends, however it ends (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the socket EOF still ends us
        pass
    if os.getppid() == 1:  # the server already went away while we started
        os._exit(0)


def _vm_data() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover


class Worker:
    def __init__(self, sock: socket.socket, memory_bytes: int, threads: int) -> None:
        import duckdb
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401

        self.duckdb, self.pa = duckdb, pa
        self.sock = sock
        self.send_lock = threading.Lock()
        self.memory_bytes = memory_bytes
        # applied before the locks below: duckdb refuses to change temp_directory once external access is off
        self.config: dict[str, Any] = {
            "memory_limit": f"{memory_bytes}B",
            "temp_directory": "",  # nothing spills anywhere: no files at all, not even duckdb's own temp dir
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "allow_unsigned_extensions": False,
            "python_enable_replacements": False,  # a name never resolves to a Python variable
        }
        if threads:
            self.config["threads"] = threads
        self.open_files: list[Any] = []
        # one in-memory database for the worker's life, locked down once (opening one costs ~7 ms, a
        # cursor on it ~0.05 ms); each query gets its own cursor and transaction, rolled back at its end
        self.db = self._connect()
        self.db.sql("SELECT 1").fetchall()  # warm: the first query pays one-time costs

    def _connect(self) -> Any:
        con = self.duckdb.connect(":memory:", config=self.config)
        con.execute("SET GLOBAL TimeZone = 'UTC'")  # results say tz=UTC, as table reads do (not duckdb's Etc/UTC)
        con.execute("SET enable_external_access = false")  # no files, no network, no ATTACH, no INSTALL
        con.execute("SET lock_configuration = true")  # nothing above can be SET back by a query
        return con

    def limit_memory(self) -> None:
        # what is mapped now (interpreter, duckdb, Arrow) + the query budget + room for Arrow's result
        # batches and Python objects around them: duckdb's own limit trips first, the OS limit catches
        # what duckdb does not account (constant folding, list building)
        limit = _vm_data() + self.memory_bytes + (128 << 20)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    def serve(self) -> None:
        send_frame(self.sock, {"ready": os.getpid()})
        while True:
            try:
                request, fds = recv_frame(self.sock)
            except (EOFError, OSError):
                return
            if not fds:
                continue
            try:
                self.handle(request, fds[0])
            finally:
                for f in self.open_files:
                    try:
                        f.close()
                    except Exception:  # noqa: BLE001 - closing a pipe we no longer need
                        pass
                self.open_files.clear()

    def _source(self, index: int, schema: Any) -> Any:
        worker = self

        class Source:
            """A table as an Arrow stream the server opens each time duckdb scans it (PyCapsule protocol)."""

            def __arrow_c_schema__(self) -> Any:
                return schema.__arrow_c_schema__()

            def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
                r, w = pipe()
                try:
                    with worker.send_lock:
                        send_frame(worker.sock, {"open": index}, [w])
                finally:
                    os.close(w)
                raw = os.fdopen(r, "rb")
                worker.open_files.append(raw)
                reader = worker.pa.ipc.open_stream(worker.pa.PythonFile(raw, mode="r"))
                return reader.__arrow_c_stream__(requested_schema)

        return Source()

    def handle(self, request: dict[str, Any], result_fd: int) -> None:
        pa = self.pa
        out = pa.PythonFile(os.fdopen(result_fd, "wb"), mode="w")
        writer: Any = None  # a pyarrow IPC writer (pyarrow is imported at run time: self.pa)
        schema = pa.schema([])
        con = None
        try:
            # everything of this query - the dataset's schema, its views, anything a statement that slipped
            # past the allow-list might create - lives in one transaction that is rolled back: the next
            # query (maybe another user's) finds the database as the worker started it
            con = self.db.cursor()
            con.execute("BEGIN TRANSACTION")
            con.execute(f"CREATE SCHEMA {quote(request['dataset'])}")
            for i, (table, schema_b64) in enumerate(request["tables"]):
                table_schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(schema_b64)))
                source = f"__flight_share_source_{i}"
                con.register(source, self._source(i, table_schema))
                con.execute(f"CREATE VIEW {quote(request['dataset'])}.{quote(table)} AS SELECT * FROM {source}")
            bindings = self._bindings(request.get("parameters"))
            if request["op"] == "schema":
                schema = self._relation(con, request["sql"], bindings[0]).limit(0).to_arrow_table().schema
                writer = pa.ipc.new_stream(out, schema)
            else:
                rows, max_rows = 0, int(request["max_rows"])
                for values in bindings:  # one execution per row of bound values, results one after the other
                    reader = self._relation(con, request["sql"], values).to_arrow_reader(int(request["batch_rows"]))
                    if writer is None:
                        schema = reader.schema
                        writer = pa.ipc.new_stream(out, schema)
                    for batch in reader:
                        rows += batch.num_rows
                        if rows > max_rows:
                            raise _Refused(f"query result exceeds the limit of {max_rows:,} rows (server.sql_max_rows); "
                                           "aggregate or add a LIMIT", "rows")
                        if not batch.schema.equals(schema):
                            try:
                                batch = batch.cast(schema)
                            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                                raise _Refused("the rows of bound values give results of different types; "
                                               "bind values of one type per parameter") from None
                        writer.write_batch(batch)
            writer.write_batch(_empty(pa, schema), custom_metadata={MARK: END})
        except BaseException as exc:  # noqa: BLE001 - every failure is reported in the stream
            kind, message = self.classify(exc)
            try:
                if writer is None:
                    writer = pa.ipc.new_stream(out, schema)
                writer.write_batch(_empty(pa, schema), custom_metadata={MARK: ERROR, "kind": kind, "message": message})
            except BaseException:  # noqa: BLE001 - the server stopped listening: nothing to tell
                pass
        finally:
            if con is not None:
                try:
                    con.execute("ROLLBACK")
                except BaseException:  # noqa: BLE001 - a failed transaction is rolled back by close
                    pass
                try:
                    con.close()
                except BaseException:  # noqa: BLE001
                    pass
            try:
                if writer is not None:
                    writer.close()
                out.close()
            except BaseException:  # noqa: BLE001 - the server stopped listening
                pass

    def _bindings(self, parameters: str | None) -> list[list[Any] | None]:
        """The rows of bound values (each a list, in placeholder order); ``[None]``: nothing bound."""
        if not parameters:
            return [None]
        table = self.pa.ipc.open_stream(self.pa.py_buffer(base64.b64decode(parameters))).read_all()
        columns = [column.to_pylist() for column in table.columns]
        return [list(row) for row in zip(*columns)] or [None]

    @staticmethod
    def _relation(con: Any, sql: str, values: list[Any] | None) -> Any:
        rel = con.sql(sql) if values is None else con.sql(sql, params=values)
        if rel is None:  # a statement, not a query (only reachable if the allow-list were bypassed)
            raise _Refused("only SELECT queries are allowed")
        return rel

    def classify(self, exc: BaseException) -> tuple[str, str]:
        duckdb = self.duckdb
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        if isinstance(exc, _Refused):
            return exc.kind, exc.message
        if isinstance(exc, (MemoryError, duckdb.OutOfMemoryException)) or "Out of Memory" in first \
                or "bad allocation" in first or "std::bad_alloc" in first:
            return "memory", first
        if isinstance(exc, duckdb.InterruptException):
            return "interrupt", first
        if isinstance(exc, duckdb.PermissionException):
            return "permission", first
        if isinstance(exc, duckdb.Error):
            return "sql", first
        if isinstance(exc, self.pa.ArrowException):
            return "source", first
        return "internal", f"{type(exc).__name__}: {first}"


class _Refused(Exception):
    def __init__(self, message: str, kind: str = "refused") -> None:
        super().__init__(message)
        self.message, self.kind = message, kind


def _empty(pa: Any, schema: Any) -> Any:
    return pa.RecordBatch.from_pylist([], schema=schema)


def main(argv: list[str]) -> None:
    fd, memory_bytes, threads = int(argv[0]), int(argv[1]), int(argv[2])
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C on the server's terminal is the server's
    sock = socket.socket(fileno=fd)
    worker = Worker(sock, memory_bytes, threads)
    worker.limit_memory()
    worker.serve()


if __name__ == "__main__":
    main(sys.argv[1:])
