"""Any dlt destination with a SQL client, through dlt's own dataset interface (``dlt.dataset``).

The fast adapters (duckdb, Delta, PostgreSQL) read with each engine's Arrow-native reader; every other
SQL destination dlt loads into (its ``sqlalchemy`` destination — SQLite, MySQL, MSSQL... — Snowflake,
BigQuery, MotherDuck, ClickHouse...) is served here the way dlt itself reads it back: the stored schema
from dlt's ``_dlt_version`` table, rows as Arrow batches from ``Relation.iter_arrow`` (so this adapter runs
Python once per batch, unlike the fast ones), writes through dlt pipelines like every adapter. Nothing is
cached in server memory (the data version is unknown here) and a table is one endpoint.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

import dlt
import pyarrow as pa
from dlt.common.destination import Destination

from flight_server.domain.config import DatasetConfig, DestinationConfig
from flight_server.domain.errors import InvalidRequest, Unavailable
from flight_server.domain.masking import mask
from flight_server.storage.base import SHARED_SCHEMA_TTL, Storage, StoredSchema
from flight_server.storage.lifetime import isolated


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class DltDatasetStorage(Storage):
    """One dataset on a destination dlt reaches with its SQL client."""

    serves_load_history = True  # _dlt_loads is a table here (storage/base.py)

    schema_ttl = SHARED_SCHEMA_TTL  # the owner's pipelines load into the same destination

    def __init__(self, dataset: DatasetConfig, destination: DestinationConfig, batch_rows: int = 122_880) -> None:
        super().__init__(dataset, destination)
        self.batch_rows = batch_rows

    # --- dlt --------------------------------------------------------------------------------
    @property
    def plain_files(self) -> bool:
        """dlt's plain filesystem layout (parquet/jsonl/csv files per table), not a SQL database."""
        return self.destination_config.type == "filesystem"

    @property
    def accepts_saves(self) -> bool:  # type: ignore[override]
        # dlt writes a filesystem table's files one by one, with no transaction and no version to go
        # back to: a save there could not be all-or-nothing, so the plain layout is served read-only
        return not self.plain_files

    def dlt_destination(self) -> Any:
        kwargs: dict[str, Any] = {"destination_name": self.destination_config.name}
        if self.destination_config.credentials is not None:
            kwargs["credentials"] = self.destination_config.credentials
        if self.plain_files:
            kwargs["bucket_url"] = self.destination_config.location
        return Destination.from_reference(self.destination_config.type, **kwargs)

    def capabilities(self) -> Any:
        return self.dlt_destination().capabilities()

    def _dataset(self) -> Any:
        return isolated(dlt.dataset, self.dlt_destination(), self.dataset.name)

    def _fail(self, exc: Exception, what: str) -> Exception:
        detail = mask(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return Unavailable(f"{what} failed on destination '{self.destination_config.name}': {detail}",
                           dataset=self.dataset.name)

    def _rows(self, sql: str, what: str, table: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` with ``{table}`` as the qualified name of ``table`` (one dataset, one client)."""

        try:
            with self._dataset().sql_client as client:
                with client.execute_query(sql.format(table=client.make_qualified_table_name(table))) as cursor:
                    return list(cursor.fetchall())
        except Exception as exc:  # noqa: BLE001 - the driver's errors, in the user's terms
            raise self._fail(exc, what) from None

    @property
    def location(self) -> str:
        if self.plain_files:
            return mask(str(self.destination_config.location))
        credentials = self.destination_config.credentials
        shown = credentials if isinstance(credentials, str) else (credentials or {}).get("database", "")
        return mask(f"{self.destination_config.type}:{shown}" if shown else self.destination_config.type)

    # --- schema -----------------------------------------------------------------------------
    def _load_stored_schema(self) -> StoredSchema | None:
        from dlt.destinations.exceptions import DatabaseUndefinedRelation

        try:
            with self._dataset().sql_client as client:
                sql = (f"SELECT version, version_hash, schema FROM {client.make_qualified_table_name('_dlt_version')} "
                       "ORDER BY inserted_at DESC")
                with client.execute_query(sql) as cursor:
                    row = cursor.fetchone()
        except DatabaseUndefinedRelation:
            return None  # nothing loaded yet
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "reading the stored schema") from None
        if row is None:
            return None
        version, version_hash, schema = row
        return StoredSchema.from_row(version, version_hash, json.loads(schema) if isinstance(schema, str) else schema)

    def forget_schema_version(self, schema_name: str, version_hash: str) -> None:
        try:
            with self._dataset().sql_client as client:
                client.execute_sql(f"DELETE FROM {client.make_qualified_table_name('_dlt_version')} "
                                   f"WHERE schema_name = {_literal(schema_name)} AND version_hash = {_literal(version_hash)}")
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "removing a schema version") from None

    # --- reading ----------------------------------------------------------------------------
    def row_count(self, table: str) -> int:
        self.table_columns(table)  # NotFound for unknown tables
        (n,), = self._rows("SELECT count(*) FROM {table}", "counting rows", table)
        return int(n)

    def reader(self, table: str, columns: Sequence[str] | None, limit: int | None,
               partition: dict[str, Any] | None = None) -> pa.RecordBatchReader:
        if partition:
            raise InvalidRequest("tables on this destination are read as one endpoint", dataset=self.dataset.name)
        schema = self.arrow_schema(table, columns)
        relation = self._dataset()[table].select(*schema.names)
        if limit is not None:
            relation = relation.limit(limit)

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                for chunk in relation.iter_arrow(chunk_size=self.batch_rows):
                    yield from chunk.cast(schema).to_batches()
            except Exception as exc:  # noqa: BLE001
                raise self._fail(exc, "read") from None

        return pa.RecordBatchReader.from_batches(schema, batches())
