"""The one interface every destination adapter implements.

An adapter knows one dataset on one destination: its stored dlt schema, the Arrow schema of each
table, cheap row counts, and Arrow C++ readers that the Flight service hands straight to
``RecordBatchStream`` (no Python on the hot path). Writes go through dlt pipelines, so an adapter
also provides the dlt destination to load into.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa
from dlt.common.libs.pyarrow import columns_to_arrow
from dlt.common.schema import Schema
from dlt.common.schema.utils import has_table_seen_data, is_complete_column

from flight_server.config import DatasetConfig, DestinationConfig
from flight_server.errors import NotFound
from flight_server.storage.lifetime import isolated


@dataclass(frozen=True)
class StoredSchema:
    """A dlt schema as the destination last stored it."""

    schema: Schema
    version: int
    version_hash: str

    @classmethod
    def from_row(cls, version: int, version_hash: str, schema_json: str | dict[str, Any]) -> "StoredSchema":
        body = json.loads(schema_json) if isinstance(schema_json, str) else schema_json
        return cls(Schema.from_dict(body), int(version), version_hash)


class Storage(ABC):
    """One dataset on one destination."""

    def __init__(self, dataset: DatasetConfig, destination: DestinationConfig) -> None:
        self.dataset = dataset
        self.destination_config = destination
        self._schema: StoredSchema | None = None
        self._schema_loaded = False
        self._capabilities: Any = None
        self._lock = threading.RLock()
        self.write_lock = threading.Lock()  # one write per dataset at a time

    # --- schema -----------------------------------------------------------------------------
    @abstractmethod
    def _load_stored_schema(self) -> StoredSchema | None:
        """Read the newest stored dlt schema of the dataset (None: nothing loaded yet)."""

    def stored_schema(self) -> StoredSchema | None:
        """The cached stored schema; :meth:`invalidate` after a write."""
        with self._lock:
            if not self._schema_loaded:
                self._schema = self._load_stored_schema()
                self._schema_loaded = True
            return self._schema

    def invalidate(self) -> None:
        """Forget cached schema (after this server wrote to the dataset)."""
        with self._lock:
            self._schema_loaded = False

    def table_names(self) -> list[str]:
        """Data tables (no dlt internals) that hold data, in schema order."""
        stored = self.stored_schema()
        if stored is None:
            return []
        return [t["name"] for t in stored.schema.data_tables(seen_data_only=True) if has_table_seen_data(t)]

    def table_columns(self, table: str) -> dict[str, Any]:
        stored = self.stored_schema()
        if stored is None or table not in self.table_names():
            raise NotFound(
                f"Table '{table}' not found in dataset '{self.dataset.name}'; tables: {', '.join(self.table_names()) or '(none)'}",
                dataset=self.dataset.name,
                table=table,
            )
        columns = stored.schema.get_table_columns(table)
        return {n: c for n, c in columns.items() if is_complete_column(c)}

    def arrow_schema(self, table: str, columns: Sequence[str] | None = None) -> pa.Schema:
        """Arrow schema from the stored dlt schema; reads no table data."""
        all_columns = self.table_columns(table)
        if columns:
            missing = [c for c in columns if c not in all_columns]
            if missing:
                raise NotFound(
                    f"Column(s) {', '.join(missing)} not found in table '{table}' of dataset '{self.dataset.name}'; "
                    f"columns: {', '.join(all_columns)}",
                    dataset=self.dataset.name,
                    table=table,
                    column=missing[0],
                )
            all_columns = {c: all_columns[c] for c in columns}
        return self.arrow_schema_for(all_columns)

    def arrow_schema_for(self, columns: dict[str, Any]) -> pa.Schema:
        # dlt's own mapping of its types to Arrow, with this destination's capabilities
        schema = columns_to_arrow(columns, self.cached_capabilities(), "UTC")
        # what a destination reader streams is nullable; advertise exactly what is streamed
        return pa.schema([f.with_nullable(True) for f in schema])

    # --- destination ------------------------------------------------------------------------
    def cached_capabilities(self) -> Any:
        """:meth:`capabilities`, resolved once: dlt resolves its config on every call (milliseconds,
        and it keeps the caller's frames alive — see :func:`lifetime.isolated`)."""
        with self._lock:
            if self._capabilities is None:
                self._capabilities = isolated(self.capabilities)
            return self._capabilities

    @abstractmethod
    def capabilities(self) -> Any:
        """dlt DestinationCapabilitiesContext of this destination."""

    @property
    def table_format(self) -> str | None:
        """The table format dlt resources written here need (e.g. ``delta``), or None."""
        return self.destination_config.table_format

    @abstractmethod
    def dlt_destination(self) -> Any:
        """A dlt destination (factory) that loads into this dataset's destination."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the data lives, secrets masked as ``***``."""

    # --- reading ----------------------------------------------------------------------------
    @abstractmethod
    def row_count(self, table: str) -> int:
        """Rows in a table (cheap on this destination), -1 if unknown."""

    @abstractmethod
    def reader(self, table: str, columns: Sequence[str] | None, limit: int | None) -> pa.RecordBatchReader:
        """A streaming Arrow reader over a table."""

    @abstractmethod
    def query(self, sql: str) -> pa.RecordBatchReader:
        """Run a read-only query already checked by the SQL sandbox."""

    def close(self) -> None:
        """Release connections."""
