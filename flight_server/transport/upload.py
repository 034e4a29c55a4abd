"""A DoPut's stream as the writer's :class:`~flight_server.domain.writer.Upload`: Flight's chunk framing and
the protocol's commit marker (:data:`client.protocol.COMMIT_METADATA`) end here.

An upload whose client sends nothing for ``server.upload_idle_seconds`` while the server waits for its next
message is ended (issue 22: 300 DoPuts that never sent held a thread and a folder each for as long as their
client stayed connected): the server hangs up on that client's connection (:mod:`.connections`, the only
way to end a call whose handler waits for the client), and the save fails with "sent nothing for N s";
nothing was written.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.flight as flight

from client.protocol import COMMIT_METADATA
from flight_server.domain.errors import InvalidRequest
from flight_server.transport import connections, memory
from flight_server.transport.call import Call
from flight_server.transport.status import over_memory_limit

#: a batch whose decoding (decompression) took more than this share of server.memory_limit from the
#: Arrow pool is refused, and so is any batch while the pool holds more than ADMIT_SHARE of it: the write
#: path after the decode keeps its headroom (transport/memory.py)
BATCH_SHARE = 1 / 8
ADMIT_SHARE = 1 / 2


class FlightUpload:
    """The record batches of a DoPut. With ``commit_marker`` the upload is whole only if its last
    message is the commit marker (a client whose own data source failed half way sends none)."""

    def __init__(self, reader: flight.MetadataRecordBatchReader, commit_marker: bool, idle_seconds: float | None = None,
                 hang_up: Callable[[], object] | None = None) -> None:
        self._reader = reader
        self._commit_marker = commit_marker
        self._committed = False
        self._idle_seconds, self._hang_up = idle_seconds, hang_up
        self._lock = threading.Lock()
        self._waiting_since: float | None = None  # when the server began waiting for the client's next message
        self._ended_idle = False
        self._done = False

    @property
    def schema(self) -> pa.Schema:
        return self._reader.schema

    @property
    def complete(self) -> bool:
        """After :meth:`batches` ran out: whether the client said the upload is whole."""
        return self._committed or not self._commit_marker

    def batches(self) -> Iterator[pa.RecordBatch]:
        if self._idle_seconds is not None and self._hang_up is not None:
            threading.Thread(target=self._watch, name="upload-idle", daemon=True).start()
        try:
            yield from self._batches()
        finally:
            self._done = True

    def _idle_error(self) -> InvalidRequest:
        return InvalidRequest(f"the upload sent nothing for {self._idle_seconds:g} s (server.upload_idle_seconds), "
                              "so the server ended it; nothing was written; send the data as it is read",
                              limit="server.upload_idle_seconds", value=self._idle_seconds)

    def _watch(self) -> None:
        """Hang up on a client that leaves the server waiting for its next message past the idle limit."""
        assert self._idle_seconds is not None and self._hang_up is not None
        while not self._done:
            time.sleep(min(1.0, self._idle_seconds / 4))
            with self._lock:
                since = self._waiting_since
                idle = since is not None and time.monotonic() - since >= self._idle_seconds and not self._done
                if idle:
                    self._ended_idle = True
            if idle:
                self._hang_up()
                return

    def _read_chunk(self) -> flight.FlightStreamChunk:
        with self._lock:
            if self._ended_idle:
                raise self._idle_error()
            self._waiting_since = time.monotonic()
        try:
            return self._reader.read_chunk()
        finally:
            with self._lock:
                self._waiting_since = None

    def _batches(self) -> Iterator[pa.RecordBatch]:
        limit, pool = memory.active_limit(), pa.default_memory_pool()
        while True:
            before = pool.bytes_allocated()
            try:
                chunk = self._read_chunk()
            except StopIteration:
                if self._ended_idle:
                    raise self._idle_error() from None
                return
            except MemoryError:  # decoding (decompressing) it passed the process's memory ceiling
                raise over_memory_limit() from None
            except (pa.ArrowException, OSError) as exc:  # pyarrow reports some IPC framing errors as IOError
                if self._ended_idle:
                    raise self._idle_error() from None
                raise InvalidRequest(f"the upload is not a valid Arrow stream: {exc}") from None
            if limit is not None and (pool.bytes_allocated() - before > limit * BATCH_SHARE
                                      or pool.bytes_allocated() > limit * ADMIT_SHARE):
                # refused while the batch is only decoded: what comes after it (dlt's Parquet encoder) must
                # never meet the ceiling - an allocation that fails there aborts the process (review finding)
                del chunk  # the traceback keeps this frame: the batch must not stay with it
                raise over_memory_limit()
            if self._committed:
                raise InvalidRequest("the upload continued after its commit marker")
            if chunk.data is None:
                if chunk.app_metadata is not None and chunk.app_metadata.to_pybytes() == COMMIT_METADATA:
                    self._committed = True
                continue
            yield chunk.data


class Uploads:
    """Opens each DoPut's :class:`FlightUpload` with the server's idle limit (``server.upload_idle_seconds``)."""

    def __init__(self, idle_seconds: float | None = None, port: Callable[[], int] | None = None) -> None:
        self.idle_seconds, self._port = idle_seconds, port

    def open(self, call: Call, commit_marker: bool) -> FlightUpload:
        hang_up = None
        if self.idle_seconds is not None and self._port is not None:
            peer, port = call.context.peer(), self._port

            def hang_up() -> bool:
                return connections.hang_up(peer, port())
        return FlightUpload(call.reader, commit_marker, self.idle_seconds, hang_up)
