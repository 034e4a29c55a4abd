"""Object lifetimes around Arrow streams: readers that own what they depend on, and dlt calls that
must not pin the caller's frames.

Flight's ``RecordBatchStream`` keeps only the C++ reader: the Python objects a handler returned are
dropped as soon as the handler returns. Some streams are only valid while a Python object lives — an
ADBC stream dies with its cursor, a duckdb scan of a registered Arrow dataset needs the connection
that holds the registration. :func:`owning_reader` wraps such a stream in a reader whose C++ side
holds a Python generator, which holds the owners and runs ``on_close`` when the stream is exhausted,
fails, or is dropped unread. The per-batch cost is one generator step (the data is not touched).

dlt 1.31's configuration resolution keeps the exceptions it collects for optional fields reachable
from global state, and their tracebacks pin every frame of the calling stack — with the locals that
the caller assigns later, e.g. a reader holding a pooled connection. :func:`isolated` runs such a call
on a fresh thread, so only that thread's own frames can be pinned.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyarrow as pa

T = TypeVar("T")


class _Lease:
    """Runs ``on_close`` once: when the stream ends, or when it is dropped (even never started)."""

    def __init__(self, owners: tuple[Any, ...], on_close: Callable[[], object] | None) -> None:
        self.owners = owners
        self.on_close = on_close

    def release(self) -> None:
        on_close, self.on_close, self.owners = self.on_close, None, ()
        if on_close is not None:
            on_close()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - nothing to report to at collection time
            pass


def owning_reader(
    reader: pa.RecordBatchReader, *owners: Any, on_close: Callable[[], object] | None = None
) -> pa.RecordBatchReader:
    """``reader``'s batches, keeping ``owners`` alive until the stream ends, then ``on_close()`` (its
    result, if any, is ignored)."""
    lease = _Lease((reader, *owners), on_close)

    def batches(lease: _Lease) -> Iterator[pa.RecordBatch]:
        try:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                yield batch
        finally:
            lease.release()

    return pa.RecordBatchReader.from_batches(reader.schema, batches(lease))


def isolated(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a fresh thread (see the module notes); its result or its exception."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="flight-share-dlt-config", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"].with_traceback(None)
    return outcome["value"]  # type: ignore[no-any-return]
