"""Destination adapters: one module per destination kind, one interface (:class:`Storage`)."""

from __future__ import annotations

from flight_server.domain.config import (
    SQL_DESTINATION_TYPES,
    DatasetConfig,
    DestinationConfig,  # noqa: F401 - re-exported for the adapters
    ProjectConfig,
)
from flight_server.domain.errors import Unsupported
from flight_server.domain.storage import Storage, StoredSchema


def open_storage(project: ProjectConfig, dataset: DatasetConfig) -> Storage:
    """The adapter for a dataset's (first) destination."""
    destination = project.destinations[dataset.destination]
    if destination.type == "duckdb":
        from flight_server.storage.duckdb import DuckDBStorage

        return DuckDBStorage(dataset, destination, project.server.batch_rows)
    if destination.type == "filesystem" and destination.table_format == "delta":
        from flight_server.storage.delta import DeltaStorage

        return DeltaStorage(dataset, destination, project.server.batch_rows)
    if destination.type == "postgres":
        from flight_server.storage.postgres import PostgresStorage

        return PostgresStorage(dataset, destination, project.server.batch_rows)
    if destination.type in SQL_DESTINATION_TYPES or destination.type == "filesystem":
        # dlt's plain parquet/jsonl/csv layout: read the way dlt reads it (duckdb views over the files)
        from flight_server.storage.dlt_dataset import DltDatasetStorage

        return DltDatasetStorage(dataset, destination, project.server.batch_rows)
    raise Unsupported(f"destination type '{destination.type}' of '{destination.name}' is not supported yet")


__all__ = ["Storage", "StoredSchema", "open_storage"]
