"""Any dlt destination with a SQL client, through dlt's own dataset interface (``dlt.dataset``).

The fast adapters (duckdb, Delta, PostgreSQL) read with each engine's Arrow-native reader; every other
SQL destination dlt loads into (its ``sqlalchemy`` destination — SQLite, MySQL, MSSQL... — Snowflake,
BigQuery, MotherDuck, ClickHouse...) is served here the way dlt itself reads it back: the stored schema
from dlt's ``_dlt_version`` table, rows as Arrow batches from ``Relation.iter_arrow`` (so this adapter runs
Python once per batch, unlike the fast ones), writes through dlt pipelines like every adapter. Nothing is
cached in server memory (the data version is unknown here) and a table is one endpoint.

A ``filesystem`` destination in dlt's plain layout (parquet/jsonl/csv files per table) is read the same
way, read-only; tables in it whose folder holds a ``_delta_log`` are Delta tables, read by the Delta
adapter (and saved, when every table of the dataset is one).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import dlt
import pyarrow as pa
from dlt.common.destination import Destination

from flight_server.domain.config import DatasetConfig, DestinationConfig
from flight_server.domain.errors import InvalidRequest, Unavailable
from flight_server.domain.identifiers import literal as _literal
from flight_server.domain.lifetime import isolated
from flight_server.domain.masking import mask
from flight_server.domain.pushdown import Predicate
from flight_server.domain.reachability import is_unreachable, unreachable
from flight_server.domain.storage import (
    LOADS_TABLE,
    SHARED_SCHEMA_TTL,
    Partition,
    Storage,
    StoredSchema,
    newest_schemas_sql,
    plain_arrow,
)

if TYPE_CHECKING:  # the annotation only: _delta_storage imports the Delta adapter where it is first needed
    from flight_server.storage.delta import DeltaStorage


def json_text(value: Any) -> str:
    """SQLAlchemy's serializer for JSON columns in saves: a JSON column reads as its JSON text (Arrow has
    no JSON type), so a string going back into one is that text, kept as it is (checked to be JSON: the
    load then fails, all-or-nothing, instead of storing text that is none); anything else is dumped as
    dlt dumps it. SQLAlchemy's default would dump the text again, storing a JSON string literal."""
    if isinstance(value, str):
        json.loads(value)
        return value
    from dlt.common.json import json as dlt_json

    return dlt_json.dumps(value)


class DltDatasetStorage(Storage):
    """One dataset on a destination dlt reaches with its SQL client."""

    serves_load_history = True  # _dlt_loads is a table here (domain/storage.py)

    schema_ttl = SHARED_SCHEMA_TTL  # the owner's pipelines load into the same destination

    def __init__(self, dataset: DatasetConfig, destination: DestinationConfig, batch_rows: int = 122_880) -> None:
        super().__init__(dataset, destination)
        self.batch_rows = batch_rows
        self._delta: DeltaStorage | None = None  # the Delta adapter over the same folder (plain filesystem layout only)
        self._is_delta: dict[str, bool] = {}  # table -> found a Delta log in its folder

    # --- dlt --------------------------------------------------------------------------------
    @property
    def plain_files(self) -> bool:
        """dlt's plain filesystem layout (parquet/jsonl/csv files per table), not a SQL database."""
        return self.destination_config.type == "filesystem"

    @property
    def accepts_saves(self) -> bool:  # type: ignore[override]
        # dlt writes a filesystem table's files one by one, with no transaction and no version to go
        # back to: a save there could not be all-or-nothing, so the plain layout is served read-only -
        # unless every table is a Delta table, where the Delta adapter's savepoint makes it so
        return not self.plain_files or self._all_delta()

    # --- Delta tables in a filesystem destination -------------------------------------------
    # A filesystem destination without ``table_format`` may still hold Delta tables (a pipeline's
    # resources loaded with ``table_format="delta"``). dlt's own reader would need duckdb's delta
    # extension, downloaded at run time; like dlt+, a table is taken as Delta when its folder holds a
    # ``_delta_log``, and read (and, when every table is Delta, saved) by the Delta adapter.
    def _delta_storage(self) -> DeltaStorage:
        from flight_server.storage.delta import DeltaStorage

        with self._lock:
            if self._delta is None:
                config = dataclasses.replace(self.destination_config, table_format="delta")
                self._delta = DeltaStorage(self.dataset, config, self.batch_rows)
            return self._delta

    def is_delta(self, table: str) -> bool:
        """Whether the table's folder holds a Delta log (checked once per table)."""
        if not self.plain_files or table == LOADS_TABLE or table not in self.table_names():
            return False  # (only the dataset's own tables are probed and remembered)
        with self._lock:
            known = self._is_delta.get(table)
        if known is None:
            delta = self._delta_storage()

            def probe() -> bool:
                if not delta.stored_schemas():
                    return False
                client = delta._client
                return bool(client.fs_client.exists(client.pathlib.join(client.get_table_dir(table), "_delta_log")))

            try:
                known = isolated(probe)
            except Exception as exc:  # noqa: BLE001 - the bucket's errors, in the user's terms
                raise self._fail(exc, "looking for a Delta log") from None
            with self._lock:
                self._is_delta[table] = known
        return known

    def _all_delta(self) -> bool:
        names = self.table_names()
        return bool(names) and all(self.is_delta(t) for t in names)

    @property
    def table_format(self) -> str | None:
        return "delta" if self.plain_files and self._all_delta() else super().table_format

    def savepoint(self, tables: Sequence[str]) -> Callable[[], None] | None:
        return self._delta_storage().savepoint(tables) if self.plain_files else None

    def invalidate(self) -> None:
        with self._lock:
            self._is_delta.clear()
            delta = self._delta
        if delta is not None:
            delta.invalidate()
        super().invalidate()

    def close(self) -> None:
        if self._delta is not None:
            self._delta.close()

    def dlt_destination(self) -> Any:
        kwargs: dict[str, Any] = {"destination_name": self.destination_config.name}
        if self.destination_config.credentials is not None:
            kwargs["credentials"] = self.destination_config.credentials
        if self.plain_files:
            kwargs["bucket_url"] = self.destination_config.location
        if self.destination_config.type == "sqlalchemy":
            kwargs["engine_kwargs"] = {"json_serializer": json_text}
        return Destination.from_reference(self.destination_config.type, **kwargs)

    def capabilities(self) -> Any:
        return self.dlt_destination().capabilities()

    def _dataset(self, table: str | None = None) -> Any:
        """dlt's dataset; for a table, bound to the dlt schema that holds it (a dataset may hold several,
        and ``dataset[table]`` knows only its schema's tables)."""
        stored = self.stored_schema(table) if table is not None else None
        if stored is None:
            return isolated(dlt.dataset, self.dlt_destination(), self.dataset.name)
        schema = stored.schema
        if table is not None and len(self.schemas_holding(table)) > 1:  # the columns every schema knows of it
            schema = schema.clone()
            for name, column in self.table_columns(table).items():
                schema.tables[table]["columns"].setdefault(name, column)
        return isolated(dlt.dataset, self.dlt_destination(), self.dataset.name, schema=schema)

    def _fail(self, exc: Exception, what: str) -> Exception:
        if is_unreachable(exc):  # the driver's text names where it tried to connect
            return unreachable(self.destination_config.name, self.dataset.name, what)
        detail = mask(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        extension = re.search(r"install the required extension '(\w+)'", str(exc))
        if extension:  # dlt reads files on a bucket through duckdb, which downloads its extensions on first use
            detail = (f"dlt reads this destination through duckdb's '{extension.group(1)}' extension, which duckdb "
                      "could not download here (no access to extensions.duckdb.org)")
        return Unavailable(f"{what} failed on destination '{self.destination_config.name}': {detail}",
                           dataset=self.dataset.name)

    def _rows(self, sql: str, what: str, table: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` with ``{table}`` as the qualified name of ``table`` (one dataset, one client)."""

        try:
            with self._dataset(table).sql_client as client:  # bound to the table's schema (its views, on files)
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
    def _load_stored_schemas(self) -> list[StoredSchema]:
        from dlt.destinations.exceptions import DatabaseUndefinedRelation

        try:
            with self._dataset().sql_client as client:
                sql = newest_schemas_sql(client.make_qualified_table_name('_dlt_version'))
                with client.execute_query(sql) as cursor:
                    rows = cursor.fetchall()
        except DatabaseUndefinedRelation:
            return []  # nothing loaded yet
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "reading the stored schema") from None
        return [StoredSchema.from_row(version, version_hash, json.loads(schema) if isinstance(schema, str) else schema)
                for version, version_hash, schema in rows]

    def forget_schema_version(self, schema_name: str, version_hash: str) -> None:
        if self.plain_files:  # a schema file in _dlt_version/, not a row
            self._delta_storage().forget_schema_version(schema_name, version_hash)
            return
        try:
            with self._dataset().sql_client as client:
                client.execute_sql(f"DELETE FROM {client.make_qualified_table_name('_dlt_version')} "
                                   f"WHERE schema_name = {_literal(schema_name)} AND version_hash = {_literal(version_hash)}")
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "removing a schema version") from None

    # --- reading ----------------------------------------------------------------------------
    def arrow_schema(self, table: str, columns: Sequence[str] | None = None) -> pa.Schema:
        if self.is_delta(table):
            return self._delta_storage().arrow_schema(table, columns)
        return super().arrow_schema(table, columns)

    def served_schema(self, table: str, columns: dict[str, Any]) -> pa.Schema:
        """The plain filesystem layout: exactly what dlt's own read of the files gives (dlt reads them
        through duckdb views, whose types come from the files: a ``uint8`` or ``float32`` Parquet column
        stays one, a JSON column of a jsonl file is its text, every timestamp is microseconds) - taken
        from a read of no rows. Other SQL destinations: dlt's mapping (domain/storage.py), which is what
        dlt's row-by-row read converts to."""
        if not self.plain_files or table == LOADS_TABLE:
            return super().served_schema(table, columns)
        try:
            empty = isolated(lambda: self._dataset(table)[table].select(*columns).limit(0).arrow())
        except Exception as exc:  # noqa: BLE001 - dlt's errors, in the user's terms
            raise self._fail(exc, "reading the table's schema") from None
        schema = plain_arrow(empty.schema)
        return pa.schema([schema.field(c) for c in columns])

    def partitions(self, table: str, target_rows: int) -> list[Partition]:
        if self.is_delta(table):
            return self._delta_storage().partitions(table, target_rows)
        return super().partitions(table, target_rows)

    def row_count(self, table: str) -> int:
        self.table_columns(table)  # NotFound for unknown tables
        if self.is_delta(table):
            return self._delta_storage().row_count(table)
        (n,), = self._rows("SELECT count(*) FROM {table}", "counting rows", table)
        return int(n)

    def reader(self, table: str, columns: Sequence[str] | None, limit: int | None,
               partition: Mapping[str, Any] | None = None,
               where: Sequence[Predicate] | None = None) -> pa.RecordBatchReader:
        if self.is_delta(table):
            return self._delta_storage().reader(table, columns, limit, partition, where)
        if where:
            limit = None  # filters are not applied here (the sandbox applies the query): no row limit either
        if partition:
            raise InvalidRequest("tables on this destination are read as one endpoint", dataset=self.dataset.name)
        schema = self.arrow_schema(table, columns)
        try:
            relation = self._dataset(table)[table].select(*schema.names)
            if limit is not None:
                relation = relation.limit(limit)
        except Exception as exc:  # noqa: BLE001 - dlt's errors, in the user's terms
            raise self._fail(exc, "read") from None

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                for chunk in relation.iter_arrow(chunk_size=self.batch_rows):
                    yield from chunk.cast(schema).to_batches()  # fails on a null in a NOT NULL field
            except Exception as exc:  # noqa: BLE001
                raise self._fail(exc, "read") from None

        return pa.RecordBatchReader.from_batches(schema, batches())
