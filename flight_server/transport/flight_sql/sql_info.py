"""GetSqlInfo: what the server really does (no DDL, no transactions, bulk ingest yes), as FlightSql.proto's
SqlInfo ids and their values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from client import __version__
from flight_server.domain.sql.parse import MAX_QUERY_CHARS

SERVER_NAME = "flight-share"

# nullable children (and the Go driver's cast then fails), so the array is built from buffers.
_SQL_INFO_CHILDREN = [
    pa.field("string_value", pa.utf8(), nullable=False),
    pa.field("bool_value", pa.bool_(), nullable=False),
    pa.field("bigint_value", pa.int64(), nullable=False),
    pa.field("int32_bitmask", pa.int32(), nullable=False),
    pa.field("string_list", pa.list_(pa.utf8()), nullable=False),
    pa.field("int32_to_int32_list_map", pa.map_(pa.int32(), pa.list_(pa.int32())), nullable=False),
]
_STRING, _BOOL, _BIGINT, _INT32, _STRING_LIST = range(5)
SQL_INFO_SCHEMA = pa.schema([
    pa.field("info_name", pa.uint32(), nullable=False),
    pa.field("value", pa.dense_union(_SQL_INFO_CHILDREN, type_codes=list(range(6))), nullable=False),
])


def _server_version() -> str:
    """This server's version and the SQL dialect statements are written in (duckdb's)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        engine = f"duckdb {version('duckdb')}"
    except PackageNotFoundError:  # pragma: no cover - duckdb is a server dependency
        engine = "duckdb"
    return f"{__version__} (SQL dialect: {engine})"


def sql_info_table(values: dict[int, tuple[int, Any]]) -> pa.Table:
    """GetSqlInfo's answer: one row per info id, each value tagged with its union child."""
    codes: list[int] = []
    offsets: list[int] = []
    children: list[list[Any]] = [[] for _ in _SQL_INFO_CHILDREN]
    for kind, value in values.values():
        codes.append(kind)
        offsets.append(len(children[kind]))
        children[kind].append(value)
    arrays = [pa.array(items, type=f.type) for items, f in zip(children, _SQL_INFO_CHILDREN, strict=True)]
    union = pa.Array.from_buffers(
        SQL_INFO_SCHEMA.field("value").type, len(codes),
        [None, pa.array(codes, pa.int8()).buffers()[1], pa.array(offsets, pa.int32()).buffers()[1]],
        children=arrays,
    )
    return pa.Table.from_arrays([pa.array(list(values), pa.uint32()), union], schema=SQL_INFO_SCHEMA)


def sql_info(wanted: Iterable[int]) -> pa.Table:
    """GetSqlInfo's answer: the info ids asked for that this server knows (every one when none is asked)."""
    infos: dict[int, tuple[int, Any]] = {
        0: (_STRING, SERVER_NAME),                 # FLIGHT_SQL_SERVER_NAME
        1: (_STRING, _server_version()),           # FLIGHT_SQL_SERVER_VERSION (names the SQL dialect)
        2: (_STRING, pa.__version__),              # FLIGHT_SQL_SERVER_ARROW_VERSION
        # statements only read; bulk ingest (CommandStatementIngest) writes, so the server is not read-only
        3: (_BOOL, False),                         # FLIGHT_SQL_SERVER_READ_ONLY
        4: (_BOOL, True),                          # FLIGHT_SQL_SERVER_SQL
        5: (_BOOL, False),                         # FLIGHT_SQL_SERVER_SUBSTRAIT
        8: (_INT32, 0),                            # FLIGHT_SQL_SERVER_TRANSACTION: SQL_SUPPORTED_TRANSACTION_NONE
        9: (_BOOL, False),                         # FLIGHT_SQL_SERVER_CANCEL: no CancelQuery (CancelFlightInfo, yes)
        10: (_BOOL, True),                         # FLIGHT_SQL_SERVER_BULK_INGESTION
        11: (_BOOL, False),                        # FLIGHT_SQL_SERVER_INGEST_TRANSACTIONS_SUPPORTED
        100: (_INT32, 0),                          # FLIGHT_SQL_SERVER_STATEMENT_TIMEOUT: handles never expire
        101: (_INT32, 0),                          # FLIGHT_SQL_SERVER_TRANSACTION_TIMEOUT: none
        500: (_BOOL, False),                       # SQL_DDL_CATALOG
        501: (_BOOL, False),                       # SQL_DDL_SCHEMA
        502: (_BOOL, False),                       # SQL_DDL_TABLE
        503: (_INT32, 1),                          # SQL_IDENTIFIER_CASE: case-insensitive (duckdb)
        504: (_STRING, '"'),                       # SQL_IDENTIFIER_QUOTE_CHAR
        505: (_INT32, 1),                          # SQL_QUOTED_IDENTIFIER_CASE: case-insensitive (duckdb)
        506: (_BOOL, True),                        # SQL_ALL_TABLES_ARE_SELECTABLE
        507: (_INT32, 3),                          # SQL_NULL_ORDERING: SQL_NULLS_SORTED_AT_END (duckdb's default)
        513: (_STRING, "\\"),                      # SQL_SEARCH_STRING_ESCAPE
        514: (_STRING, ""),                        # SQL_EXTRA_NAME_CHARACTERS
        515: (_BOOL, True),                        # SQL_SUPPORTS_COLUMN_ALIASING
        516: (_BOOL, True),                        # SQL_NULL_PLUS_NULL_IS_NULL
        523: (_BOOL, True),                        # SQL_SUPPORTS_LIKE_ESCAPE_CLAUSE
        529: (_STRING, "dataset"),                 # SQL_SCHEMA_TERM
        531: (_STRING, "project"),                 # SQL_CATALOG_TERM
        532: (_BOOL, True),                        # SQL_CATALOG_AT_START
        557: (_BIGINT, MAX_QUERY_CHARS),           # SQL_MAX_STATEMENT_LENGTH
        562: (_INT32, 0),                          # SQL_DEFAULT_TRANSACTION_ISOLATION: SQL_TRANSACTION_NONE
        563: (_BOOL, False),                       # SQL_TRANSACTIONS_SUPPORTED
        572: (_BOOL, False),                       # SQL_BATCH_UPDATES_SUPPORTED
        573: (_BOOL, False),                       # SQL_SAVEPOINTS_SUPPORTED
        574: (_BOOL, False),                       # SQL_NAMED_PARAMETERS_SUPPORTED ($name: refused; ? and $1 bind)
    }
    ids = list(wanted) or list(infos)
    return sql_info_table({i: infos[i] for i in ids if i in infos})
