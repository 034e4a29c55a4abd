"""The interface the surfaces run checked SQL through: the sandbox, or the router that sends some queries to
the warehouse (:class:`flight_server.domain.warehouse.WarehouseRouter`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import pyarrow as pa

from flight_server.domain.sql.check import CheckedQuery
from flight_server.domain.sql.rowwise import TablePartition
from flight_server.domain.storage import Storage


class SqlEngine(Protocol):
    """What the surfaces use to run checked SQL: the sandbox, or the router that sends some queries to the
    warehouse (:class:`flight_server.domain.warehouse.WarehouseRouter`)."""

    @property
    def timeout(self) -> float: ...

    @property
    def max_rows(self) -> int: ...

    def schema(self, storage: Storage, query: CheckedQuery, cancelled: Callable[[], bool] | None = None,
               parameters: pa.Table | None = None, *, user: str | None = None) -> pa.Schema: ...

    def run(self, storage: Storage, query: CheckedQuery, cancelled: Callable[[], bool] | None = None,
            parameters: pa.Table | None = None, *, partition: TablePartition | None = None,
            user: str | None = None) -> pa.RecordBatchReader: ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...
