"""The metadata commands: GetCatalogs, GetDbSchemas, GetTables (``include_schema``: fields carry
FlightSql.proto's ``ARROW:FLIGHT:SQL:*`` column metadata, type names in duckdb's SQL), GetTableTypes,
GetPrimaryKeys (dlt's ``primary_key`` hints), GetXdbcTypeInfo and GetSqlInfo.

Each answers GetFlightInfo with one endpoint whose ticket is the command itself, GetSchema with its
result schema, and DoGet with its rows under the caller's profile: the datasets it sees are the
db_schemas, their tables the tables (type ``TABLE``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf.message import Message

from flight_server._vendor import FlightSql_pb2 as pb
from flight_server._vendor import flight_messages as fm
from flight_server.domain.catalog import Catalog
from flight_server.domain.errors import InvalidRequest, Unavailable
from flight_server.transport.call import Call
from flight_server.transport.decode import Request
from flight_server.transport.flight_sql.patterns import checked_pattern, like
from flight_server.transport.flight_sql.sql_info import SQL_INFO_SCHEMA, sql_info
from flight_server.transport.flight_sql.types import XDBC_TYPE_INFO_SCHEMA, column_metadata, xdbc_type_info
from flight_server.transport.flight_sql.wire import Routes, one_endpoint_info

log = logging.getLogger("flight_share.server")

TABLE_TYPE = "TABLE"

# --- result schemas of the metadata commands (FlightSql.proto) --------------------------------------
CATALOGS_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8(), nullable=False)])
DB_SCHEMAS_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8()),
                               pa.field("db_schema_name", pa.utf8(), nullable=False)])
TABLES_SCHEMA = pa.schema([
    pa.field("catalog_name", pa.utf8()), pa.field("db_schema_name", pa.utf8()),
    pa.field("table_name", pa.utf8(), nullable=False), pa.field("table_type", pa.utf8(), nullable=False),
])
TABLES_SCHEMA_WITH_SCHEMA = TABLES_SCHEMA.append(pa.field("table_schema", pa.binary(), nullable=False))
TABLE_TYPES_SCHEMA = pa.schema([pa.field("table_type", pa.utf8(), nullable=False)])
PRIMARY_KEYS_SCHEMA = pa.schema([
    pa.field("catalog_name", pa.utf8()), pa.field("db_schema_name", pa.utf8()),
    pa.field("table_name", pa.utf8(), nullable=False), pa.field("column_name", pa.utf8(), nullable=False),
    pa.field("key_name", pa.utf8()), pa.field("key_sequence", pa.int32(), nullable=False),
])


@contextlib.contextmanager
def _unless_one_of_many(dataset: str, count: int) -> Iterator[None]:
    """Browsing several datasets: one whose destination is unreachable is left out (and logged), as the
    catalog does, so the healthy ones stay browsable; asked for alone, its error is the answer."""
    try:
        yield
    except Unavailable:
        if count <= 1:
            raise
        log.warning("dataset %s left out of a Flight SQL listing: its destination is unavailable", dataset)


class MetadataCommands:
    """The handlers of the metadata commands, over the project's catalog."""

    def __init__(self, catalog_name: str, catalog: Catalog) -> None:
        self.catalog_name = catalog_name
        self.catalog = catalog
        self._metadata: dict[type[Message], tuple[Callable[[Any], pa.Schema], Callable[..., pa.Table]]] = {
            pb.CommandGetSqlInfo: (lambda _c: SQL_INFO_SCHEMA, self._sql_info),
            pb.CommandGetCatalogs: (lambda _c: CATALOGS_SCHEMA, self._catalogs),
            pb.CommandGetDbSchemas: (lambda _c: DB_SCHEMAS_SCHEMA, self._db_schemas),
            pb.CommandGetTables: (lambda c: TABLES_SCHEMA_WITH_SCHEMA if c.include_schema else TABLES_SCHEMA,
                                  self._tables),
            pb.CommandGetTableTypes: (lambda _c: TABLE_TYPES_SCHEMA, self._table_types),
            fm.CommandGetPrimaryKeys: (lambda _c: PRIMARY_KEYS_SCHEMA, self._primary_keys),
            fm.CommandGetXdbcTypeInfo: (lambda _c: XDBC_TYPE_INFO_SCHEMA, self._xdbc_type_info),
        }

    def routes(self) -> Routes:
        """GetFlightInfo, GetSchema and DoGet of every metadata command."""
        routes: Routes = {}
        for message in self._metadata:
            name = message.DESCRIPTOR.name
            routes[("get_flight_info", name)] = self._metadata_info
            routes[("get_schema", name)] = self._metadata_schema
            routes[("do_get", name)] = self._metadata_get
        return routes

    def _metadata_info(self, call: Call, request: Request) -> flight.FlightInfo:
        schema_of, _ = self._metadata[type(request.message)]
        if call.descriptor is None:  # GetFlightInfo always has one
            raise InvalidRequest(f"{request.kind} came without a flight descriptor")
        # the ticket is the command itself: DoGet answers it under the caller's profile then
        return one_endpoint_info(schema_of(request.message), call.descriptor, call.descriptor.command)

    def _metadata_schema(self, call: Call, request: Request) -> flight.SchemaResult:
        return flight.SchemaResult(self._metadata[type(request.message)][0](request.message))

    def _metadata_get(self, call: Call, request: Request) -> flight.FlightDataStream:
        return flight.RecordBatchStream(self._metadata[type(request.message)][1](call, request.message))

    def _sql_info(self, call: Call, command: Any) -> pa.Table:
        return sql_info(command.info)

    def _catalogs(self, call: Call, command: Any) -> pa.Table:
        return pa.Table.from_pylist([{"catalog_name": self.catalog_name}], schema=CATALOGS_SCHEMA)

    def _datasets(self, call: Call, catalog: str | None, pattern: str | None) -> list[str]:
        """The datasets the caller sees, narrowed by a catalog and a schema filter pattern."""
        if catalog is not None and catalog != self.catalog_name:
            return []
        matches = like(checked_pattern(pattern, "db_schema_filter_pattern"))
        return sorted(d for d in self.catalog.visible(call.profile) if matches(d))

    def _db_schemas(self, call: Call, command: Any) -> pa.Table:
        catalog = command.catalog if command.HasField("catalog") else None
        pattern = command.db_schema_filter_pattern if command.HasField("db_schema_filter_pattern") else None
        rows = [{"catalog_name": self.catalog_name, "db_schema_name": d} for d in self._datasets(call, catalog, pattern)]
        return pa.Table.from_pylist(rows, schema=DB_SCHEMAS_SCHEMA)

    def _tables(self, call: Call, command: Any) -> pa.Table:
        catalog = command.catalog if command.HasField("catalog") else None
        pattern = command.db_schema_filter_pattern if command.HasField("db_schema_filter_pattern") else None
        matches = like(checked_pattern(command.table_name_filter_pattern, "table_name_filter_pattern")
                       if command.HasField("table_name_filter_pattern") else None)
        schema = TABLES_SCHEMA_WITH_SCHEMA if command.include_schema else TABLES_SCHEMA
        rows = []
        if not command.table_types or TABLE_TYPE in command.table_types:
            datasets = self._datasets(call, catalog, pattern)
            for dataset in datasets:
                with _unless_one_of_many(dataset, len(datasets)):
                    storage = self.catalog.storage(dataset)
                    found = []
                    for table in sorted(t for t in storage.table_names() if matches(t)):
                        row = {"catalog_name": self.catalog_name, "db_schema_name": dataset,
                               "table_name": table, "table_type": TABLE_TYPE}
                        if command.include_schema:
                            hints = storage.table_columns(table)
                            fields = [column_metadata(f, self.catalog_name, dataset, table, hints.get(f.name, {}))
                                      for f in storage.arrow_schema(table)]
                            row["table_schema"] = pa.schema(fields).serialize().to_pybytes()
                        found.append(row)
                    rows += found
        return pa.Table.from_pylist(rows, schema=schema)

    def _primary_keys(self, call: Call, command: Any) -> pa.Table:
        """GetPrimaryKeys: the columns dlt stores with the ``primary_key`` hint, in column order."""
        catalog = command.catalog if command.HasField("catalog") else None
        rows = []
        datasets = [d for d in self._datasets(call, catalog, None)
                    if not command.HasField("db_schema") or d == command.db_schema]
        for dataset in datasets:
            with _unless_one_of_many(dataset, len(datasets)):
                storage = self.catalog.storage(dataset)
                if command.table not in storage.table_names():
                    continue
                keys = [name for name, hints in storage.table_columns(command.table).items() if hints.get("primary_key")]
                rows += [{"catalog_name": self.catalog_name, "db_schema_name": dataset, "table_name": command.table,
                          "column_name": name, "key_name": None, "key_sequence": i} for i, name in enumerate(keys, 1)]
        return pa.Table.from_pylist(rows, schema=PRIMARY_KEYS_SCHEMA)

    def _xdbc_type_info(self, call: Call, command: Any) -> pa.Table:
        return xdbc_type_info(command.data_type if command.HasField("data_type") else None)

    def _table_types(self, call: Call, command: Any) -> pa.Table:
        return pa.Table.from_pylist([{"table_type": TABLE_TYPE}], schema=TABLE_TYPES_SCHEMA)
