"""A DoPut's stream as the writer's :class:`~flight_server.domain.writer.Upload`: Flight's chunk framing and
the protocol's commit marker (:data:`client.protocol.COMMIT_METADATA`) end here."""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.flight as flight

from client.protocol import COMMIT_METADATA
from flight_server.domain.errors import InvalidRequest
from flight_server.transport import memory
from flight_server.transport.status import over_memory_limit


#: a batch whose decoding (decompression) took more than this share of server.memory_limit from the
#: Arrow pool is refused, and so is any batch while the pool holds more than ADMIT_SHARE of it: the write
#: path after the decode keeps its headroom (transport/memory.py)
BATCH_SHARE = 1 / 8
ADMIT_SHARE = 1 / 2


class FlightUpload:
    """The record batches of a DoPut. With ``commit_marker`` the upload is whole only if its last
    message is the commit marker (a client whose own data source failed half way sends none)."""

    def __init__(self, reader: flight.MetadataRecordBatchReader, commit_marker: bool) -> None:
        self._reader = reader
        self._commit_marker = commit_marker
        self._committed = False

    @property
    def schema(self) -> pa.Schema:
        return self._reader.schema

    @property
    def complete(self) -> bool:
        """After :meth:`batches` ran out: whether the client said the upload is whole."""
        return self._committed or not self._commit_marker

    def batches(self) -> Iterator[pa.RecordBatch]:
        limit, pool = memory.active_limit(), pa.default_memory_pool()
        while True:
            before = pool.bytes_allocated()
            try:
                chunk = self._reader.read_chunk()
            except StopIteration:
                return
            except MemoryError:  # decoding (decompressing) it passed the process's memory ceiling
                raise over_memory_limit() from None
            except (pa.ArrowException, OSError) as exc:  # pyarrow reports some IPC framing errors as IOError
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
