"""The server process's ceiling on Arrow memory (``server.memory_limit``).

Everything a request decodes lands in Arrow's default memory pool: uploads (DoPut, bound parameters,
Flight SQL ingest), the table cache, the streams it serves. pyarrow decodes a DoPut's messages itself -
decompression included - before a handler sees a batch, and exposes neither the compressed size nor a
per-call cap: a few kilobytes of zstd can declare gigabytes of zeros. So the cap is the pool's own:
Arrow's bundled mimalloc, told to take memory only from one arena reserved at start
(``MIMALLOC_RESERVE_OS_MEMORY`` + ``MIMALLOC_LIMIT_OS_ALLOC``). An allocation past it fails inside
Arrow (``ArrowMemoryError``) *before* the memory is taken; the request that asked gets a clear error
(:mod:`flight_server.transport.status`), the rest of the process (Python, gRPC, duckdb, delta-rs, which
allocate elsewhere) is untouched. mimalloc reads its options once, at process start, so
:func:`enforce` re-executes the ``serve`` command with them set.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

log = logging.getLogger("flight_share.server")

#: set in the re-executed process: the limit in bytes that its Arrow pool was started with
LIMIT_ENV = "FLIGHT_SHARE_ARROW_MEMORY_LIMIT"

_limit: int | None = None


def default_limit() -> int:
    """Half of the machine's physical memory (``server.memory_limit`` unset)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def active_limit() -> int | None:
    """The ceiling this process runs under (None: none, e.g. a server built inside a test process)."""
    return _limit


def _pool_env(limit: int) -> dict[str, str]:
    return {
        "ARROW_DEFAULT_MEMORY_POOL": "mimalloc",
        "MIMALLOC_RESERVE_OS_MEMORY": f"{max(limit // 1024, 1)}KiB",
        "MIMALLOC_LIMIT_OS_ALLOC": "1",
        LIMIT_ENV: str(limit),
    }


def _reexec(limit: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv: the interpreter's own command line (``python -m flight_server.cli serve ...`` or
    # ``python .../bin/flight-share serve ...``), so the new image runs exactly the same command
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **_pool_env(limit)})


def enforce(limit: int) -> None:
    """Run the rest of this process under an Arrow memory ceiling of ``limit`` bytes (re-executes once)."""
    global _limit
    if any(os.environ.get(k) != v for k, v in _pool_env(limit).items()):
        _reexec(limit)
    import pyarrow as pa

    pool = pa.default_memory_pool()
    if pool.backend_name != "mimalloc":  # a pyarrow built without mimalloc: serve, uncapped, and say so
        log.warning("pyarrow has no mimalloc pool here; server.memory_limit is not enforced")
        return
    pa.allocate_buffer(1, memory_pool=pool)  # the reserved arena works (it fails loudly here otherwise)
    _limit = limit
