"""Arrow Flight SQL on the same port as the plain Flight surface, onto the same rooms.

Flight SQL requests are ``google.protobuf.Any`` messages (FlightSql.proto) in command descriptors,
tickets, DoPut descriptors and action bodies; :mod:`flight_server.transport.decode` decodes them with
everything else, and :meth:`FlightSqlSurface.routes` adds one handler per (RPC, message) to the server's
one dispatch table. Anything else - an unknown message, or a known one on an RPC it has no meaning
for - answers UNIMPLEMENTED naming the message. Errors leave through the one mapping table
(:mod:`flight_server.transport.status`), like every other RPC.

How the project looks to a Flight SQL client:

- catalog   = the project (one catalog, ``project.name``);
- db_schema = a dataset the caller's profile may see;
- table     = a table of that dataset (table type ``TABLE``).

The modules, one job each:

- ``surface.py``: :class:`FlightSqlSurface`, its parts' routes in one table;
- ``statements.py``: statements and prepared statements (read-only SELECTs through the SQL sandbox, bound
  parameters, one endpoint per partition of a large table, CancelFlightInfo);
- ``handles.py``: statement handles and tickets - the statement itself, sealed (the server keeps no statement
  state); a ticket also signed for its caller and expiring, like a plain DoGet ticket;
- ``metadata.py``: GetCatalogs, GetDbSchemas, GetTables, GetTableTypes, GetPrimaryKeys, GetXdbcTypeInfo,
  GetSqlInfo;
- ``sql_info.py``: the SqlInfo values (what the server really does) and their union-typed table;
- ``types.py``: Arrow <-> SQL type names (duckdb's) and FlightSql.proto's column metadata;
- ``patterns.py``: the LIKE filter patterns of the metadata commands;
- ``sessions.py``: SetSessionOptions / GetSessionOptions / CloseSession (the current catalog and db_schema);
- ``ingest.py``: bulk ingest (``CommandStatementIngest``) through the one write path (``Writer.put``);
- ``wire.py``: what they share (the handler type, ``pack``, a one-endpoint FlightInfo, no transactions).
"""

from flight_server.transport.flight_sql.handles import (
    MAX_PARTITION_BYTES,
    Statement,
    decode_handle,
    decode_ticket,
    encode_handle,
    encode_ticket,
)
from flight_server.transport.flight_sql.metadata import (
    CATALOGS_SCHEMA,
    DB_SCHEMAS_SCHEMA,
    PRIMARY_KEYS_SCHEMA,
    TABLE_TYPE,
    TABLE_TYPES_SCHEMA,
    TABLES_SCHEMA,
    TABLES_SCHEMA_WITH_SCHEMA,
)
from flight_server.transport.flight_sql.patterns import MAX_PATTERN_CHARS, like
from flight_server.transport.flight_sql.sessions import SESSION_OPTIONS
from flight_server.transport.flight_sql.sql_info import SERVER_NAME, SQL_INFO_SCHEMA, sql_info_table
from flight_server.transport.flight_sql.surface import FlightSqlSurface
from flight_server.transport.flight_sql.types import (
    COLUMN_METADATA,
    XDBC_TYPE_INFO_SCHEMA,
    column_metadata,
    sql_type_name,
    xdbc_type_info,
)
from flight_server.transport.flight_sql.wire import Handler, pack

__all__ = [
    "CATALOGS_SCHEMA",
    "COLUMN_METADATA",
    "DB_SCHEMAS_SCHEMA",
    "MAX_PARTITION_BYTES",
    "MAX_PATTERN_CHARS",
    "PRIMARY_KEYS_SCHEMA",
    "SERVER_NAME",
    "SESSION_OPTIONS",
    "SQL_INFO_SCHEMA",
    "TABLES_SCHEMA",
    "TABLES_SCHEMA_WITH_SCHEMA",
    "TABLE_TYPE",
    "TABLE_TYPES_SCHEMA",
    "XDBC_TYPE_INFO_SCHEMA",
    "FlightSqlSurface",
    "Handler",
    "Statement",
    "column_metadata",
    "decode_handle",
    "decode_ticket",
    "encode_handle",
    "encode_ticket",
    "like",
    "pack",
    "sql_info_table",
    "sql_type_name",
    "xdbc_type_info",
]
