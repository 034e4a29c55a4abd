"""Arrow Flight SQL on the same port as the plain Flight surface, onto the same rooms.

Flight SQL requests are ``google.protobuf.Any`` messages (FlightSql.proto) in command descriptors,
tickets, DoPut descriptors and action bodies; :mod:`flight_server.transport.decode` decodes them with
everything else, and :meth:`FlightSqlSurface.routes` adds one handler per (RPC, message) to the server's
one dispatch table. Anything else — an unknown message, or a known one on an RPC it has no meaning
for — answers UNIMPLEMENTED naming the message. Errors leave through the one mapping table
(:mod:`flight_server.transport.status`), like every other RPC.

How the project looks to a Flight SQL client:

- catalog   = the project (one catalog, ``project.name``);
- db_schema = a dataset the caller's profile may see;
- table     = a table of that dataset (table type ``TABLE``).

Statements are read-only SELECTs (duckdb's dialect) through the same sandbox as the plain ``sql``
command. Every table is written ``dataset.table`` (or ``project.dataset.table``), or unqualified when the
caller's session set a current ``schema``; one statement reads one dataset (datasets may live on
different destinations, so there is no cross-dataset join). Statement and prepared statement handles
carry the statement itself (:class:`Statement`): the server keeps no per-statement state, and every
DoGet runs the sandbox again under the caller's profile.

Large results in parallel: a row-wise statement over one table (:func:`~flight_server.domain.sql.row_wise_table`)
whose table has several partitions (``Storage.partitions(table, server.sql_endpoint_rows)``) is answered as one
endpoint per partition, ``ordered=False``, naming the replicas (``server.locations``) round-robin. Each
endpoint's handle carries the statement and its partition ``{"dataset", "table", "spec"}``, sealed together
(:func:`encode_handle`), and DoGet runs the statement over that partition only; a partition this server did
not plan for this statement, or planned for another dataset, is refused. Each endpoint is a query of its own
under the sandbox's limits. The plain ``sql`` command stays one endpoint.

Bound parameters (``?``, ``$1``): ``CreatePreparedStatement`` answers the parameter schema (``$1``...,
null-typed); ``DoPut(CommandPreparedStatementQuery)`` with a batch of values (one row per execution, at
most :data:`~flight_server.domain.sql.MAX_PARAMETER_ROWS` rows and ``MAX_PARAMETER_BYTES`` of Arrow IPC)
answers a ``DoPutPreparedStatementResult`` whose new handle carries the statement and the values;
clients execute that handle (GetFlightInfo, DoGet). duckdb binds the values in the sandbox; several rows
run the query once each and their results follow one another. Statement updates
(``CommandStatementUpdate``, ``CommandPreparedStatementUpdate``) are refused: read-only except ingest.

Sessions (:mod:`flight_server.transport.session`): ``SetSessionOptions`` / ``GetSessionOptions`` /
``CloseSession`` with options ``catalog`` (the project) and ``schema`` (a dataset), keyed by Flight's
``arrow_flight_session_id`` cookie and the caller's user, in a bounded map.

Metadata: GetCatalogs, GetDbSchemas, GetTables (``include_schema``: fields carry FlightSql.proto's
``ARROW:FLIGHT:SQL:*`` column metadata, type names in duckdb's SQL), GetTableTypes, GetPrimaryKeys
(dlt's ``primary_key`` hints), GetXdbcTypeInfo, GetSqlInfo (what the server really does: no DDL, no
transactions, ingest yes). Cancelling a call (ADBC's ``adbc_cancel``, a client gone mid-stream) or
the ``CancelFlightInfo`` action (the caller's running DoGets of the FlightInfo's tickets) ends the
query's sandbox process at once.

Bulk ingest (``CommandStatementIngest``) goes through ``Writer.put``: the same permissions, dlt
contracts and error texts as the plain DoPut (the dispatch drops the cache and writes the audit line
for both). ``schema`` names the dataset.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from client import __version__
from client.protocol import WriteCommand
from flight_server._vendor import FlightSql_pb2 as pb
from flight_server._vendor import flight_messages as fm
from flight_server.domain.catalog import Catalog
from flight_server.domain.errors import Cancelled, InvalidRequest, NotFound, Unavailable, Unsupported
from flight_server.domain.partitions import LocationRing
from flight_server.domain.sql import (
    MAX_PARAMETER_BYTES,
    MAX_QUERY_CHARS,
    CheckedQuery,
    SqlEngine,
    TablePartition,
    check_parameters,
    check_query,
    parameter_count,
    parameter_schema,
    parse_statement,
    referenced_datasets,
    row_wise_table,
)
from flight_server.domain.writer import Writer
from flight_server.domain.storage import Storage
from flight_server.transport.call import Call
from flight_server.transport.decode import ACTION_BODIES, RAW_ACTION_BODIES, Request, short_name, unpack_any
from flight_server.transport.session import LastBound, MAX_OPTION_CHARS, Session, SessionStore, cookie_of
from flight_server.transport.tickets import TicketSigner
from flight_server.transport.upload import Uploads

log = logging.getLogger("flight_share.server")

TABLE_TYPE = "TABLE"
SERVER_NAME = "flight-share"
_HANDLE_PREFIX = b"flight-share/statement/v1:"

# the session options this server knows (the names ADBC's Flight SQL driver uses for the current catalog
# and db_schema)
SESSION_OPTIONS = ("catalog", "schema")

Handler = Callable[[Call, Request], Any]


def pack(message: Message) -> bytes:
    """``message`` in a serialised ``google.protobuf.Any``."""
    wrapped = any_pb2.Any()
    wrapped.Pack(message)
    return wrapped.SerializeToString()


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
XDBC_TYPE_INFO_SCHEMA = pa.schema([
    pa.field("type_name", pa.utf8(), nullable=False), pa.field("data_type", pa.int32(), nullable=False),
    pa.field("column_size", pa.int32()), pa.field("literal_prefix", pa.utf8()), pa.field("literal_suffix", pa.utf8()),
    pa.field("create_params", pa.list_(pa.field("item", pa.utf8(), nullable=False))),
    pa.field("nullable", pa.int32(), nullable=False), pa.field("case_sensitive", pa.bool_(), nullable=False),
    pa.field("searchable", pa.int32(), nullable=False), pa.field("unsigned_attribute", pa.bool_()),
    pa.field("fixed_prec_scale", pa.bool_(), nullable=False), pa.field("auto_increment", pa.bool_()),
    pa.field("local_type_name", pa.utf8()), pa.field("minimum_scale", pa.int32()), pa.field("maximum_scale", pa.int32()),
    pa.field("sql_data_type", pa.int32(), nullable=False), pa.field("datetime_subcode", pa.int32()),
    pa.field("num_prec_radix", pa.int32()), pa.field("interval_precision", pa.int32()),
])

# FlightSql.proto's column metadata keys (on the fields of GetTables' table_schema)
COLUMN_METADATA = "ARROW:FLIGHT:SQL:"

# The SQL types a column can have here (duckdb's names: statements are duckdb SQL): GetXdbcTypeInfo's rows.
# (name, XdbcDataType, column_size, literal (prefix, suffix), unsigned, XdbcDatetimeSubcode); date/time types
# have sql_data_type XDBC_DATETIME (9) and a subcode, the others their data_type.
_XDBC_TYPES: tuple[tuple[str, int, int | None, tuple[str, str] | None, bool | None, int | None], ...] = (
    ("BOOLEAN", -7, 1, None, None, None),
    ("TINYINT", -6, 3, None, False, None),
    ("BIGINT", -5, 19, None, False, None),
    ("UBIGINT", -5, 20, None, True, None),
    ("BLOB", -3, None, ("'", "'::BLOB"), None, None),
    ("JSON", -1, None, ("'", "'::JSON"), None, None),
    ("DECIMAL", 3, 38, None, False, None),
    ("INTEGER", 4, 10, None, False, None),
    ("UINTEGER", 4, 10, None, True, None),
    ("SMALLINT", 5, 5, None, False, None),
    ("FLOAT", 7, 7, None, False, None),
    ("DOUBLE", 8, 15, None, False, None),
    ("VARCHAR", 12, None, ("'", "'"), None, None),
    ("DATE", 91, 10, ("DATE '", "'"), None, 1),
    ("TIME", 92, 15, ("TIME '", "'"), None, 2),
    ("TIMESTAMP", 93, 26, ("TIMESTAMP '", "'"), None, 3),
    ("TIMESTAMP WITH TIME ZONE", 93, 32, ("TIMESTAMPTZ '", "'"), None, 3),
)


def xdbc_type_info(data_type: int | None = None) -> pa.Table:
    """GetXdbcTypeInfo's answer: every type, or those of one XDBC data type."""
    rows = []
    for name, xdbc, size, literal, unsigned, subcode in _XDBC_TYPES:
        if data_type is not None and xdbc != data_type:
            continue
        numeric = unsigned is not None
        rows.append({
            "type_name": name, "data_type": xdbc, "column_size": size,
            "literal_prefix": literal[0] if literal else None, "literal_suffix": literal[1] if literal else None,
            "create_params": ["precision", "scale"] if name == "DECIMAL" else None,
            "nullable": 1, "case_sensitive": name in ("VARCHAR", "JSON"), "searchable": 3,  # XDBC_SEARCHABLE_FULL
            "unsigned_attribute": unsigned, "fixed_prec_scale": False, "auto_increment": False if numeric else None,
            "local_type_name": name, "minimum_scale": 0 if name == "DECIMAL" else None,
            "maximum_scale": 38 if name == "DECIMAL" else None, "sql_data_type": 9 if subcode else xdbc,
            "datetime_subcode": subcode, "num_prec_radix": 10 if numeric else None, "interval_precision": None,
        })
    return pa.Table.from_pylist(rows, schema=XDBC_TYPE_INFO_SCHEMA)


def sql_type_name(arrow_type: pa.DataType, dlt_type: str | None = None) -> str:
    """The SQL (duckdb) name of a column's type, as statements see it."""
    if dlt_type == "json":
        return "JSON"
    t = arrow_type
    for test, name in ((pa.types.is_boolean, "BOOLEAN"), (pa.types.is_int8, "TINYINT"), (pa.types.is_int16, "SMALLINT"),
                       (pa.types.is_int32, "INTEGER"), (pa.types.is_int64, "BIGINT"), (pa.types.is_uint8, "UTINYINT"),
                       (pa.types.is_uint16, "USMALLINT"), (pa.types.is_uint32, "UINTEGER"), (pa.types.is_uint64, "UBIGINT"),
                       (pa.types.is_float32, "FLOAT"), (pa.types.is_float64, "DOUBLE"), (pa.types.is_date, "DATE"),
                       (pa.types.is_time, "TIME")):
        if test(t):
            return name
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "VARCHAR"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return "BLOB"
    if pa.types.is_decimal(t):
        return f"DECIMAL({t.precision},{t.scale})"
    if pa.types.is_timestamp(t):
        return "TIMESTAMP WITH TIME ZONE" if t.tz else "TIMESTAMP"
    return str(t).upper()


def column_metadata(field: pa.Field, catalog: str, dataset: str, table: str, hints: dict[str, Any]) -> pa.Field:
    """A table column as Flight SQL describes it: FlightSql.proto's column metadata keys on its field."""
    meta = {"CATALOG_NAME": catalog, "SCHEMA_NAME": dataset, "TABLE_NAME": table,
            "TYPE_NAME": sql_type_name(field.type, hints.get("data_type")),
            "IS_AUTO_INCREMENT": "0", "IS_READ_ONLY": "1", "IS_SEARCHABLE": "1",
            "IS_CASE_SENSITIVE": "1" if pa.types.is_string(field.type) or pa.types.is_large_string(field.type) else "0"}
    if pa.types.is_decimal(field.type):
        meta["PRECISION"], meta["SCALE"] = str(field.type.precision), str(field.type.scale)
    elif hints.get("precision") is not None:
        meta["PRECISION"] = str(hints["precision"])
    return field.with_metadata({**(field.metadata or {}), **{(COLUMN_METADATA + k).encode(): v.encode() for k, v in meta.items()}})

# GetSqlInfo's value: a dense union whose children are not nullable. pa.UnionArray.from_dense makes
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
    arrays = [pa.array(items, type=f.type) for items, f in zip(children, _SQL_INFO_CHILDREN)]
    union = pa.Array.from_buffers(
        SQL_INFO_SCHEMA.field("value").type, len(codes),
        [None, pa.array(codes, pa.int8()).buffers()[1], pa.array(offsets, pa.int32()).buffers()[1]],
        children=arrays,
    )
    return pa.Table.from_arrays([pa.array(list(values), pa.uint32()), union], schema=SQL_INFO_SCHEMA)


def like(pattern: str | None) -> Callable[[str], bool]:
    """A Flight SQL filter pattern (``%`` any run, ``_`` one character, ``\\`` escapes) as a predicate.

    Matched in time linear in the pattern plus (name length x longest ``%``-free piece), never by
    backtracking: the pattern splits at ``%`` into pieces, the first anchored at the start, the last at
    the end, and every piece between at its leftmost place after the previous one (leftmost is always
    safe: a later place leaves less room for the rest). ``\\`` takes the next character literally (the
    server reports ``\\`` as SQL_SEARCH_STRING_ESCAPE); a trailing lone ``\\`` is itself.
    """
    if pattern is None:
        return lambda _name: True
    pieces = _like_pieces(pattern)
    if len(pieces) == 1:
        only = pieces[0]
        return lambda name: len(name) == len(only) and _piece_at(only, name, 0)
    return lambda name: _like_match(pieces, name)


# names are short: a longer pattern is a mistake (and parsing megabytes would hold the GIL for a while)
MAX_PATTERN_CHARS = 10_000


def _checked_pattern(pattern: str | None, field: str) -> str | None:
    if pattern is not None and len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidRequest(f"{field} is {len(pattern):,} characters; at most {MAX_PATTERN_CHARS:,} allowed")
    return pattern


# a piece is a tuple of characters, with None for ``_`` (any one character)
_Piece = tuple


def _like_pieces(pattern: str) -> list[_Piece]:
    """The ``%``-separated pieces of a LIKE pattern (runs of ``%`` count once)."""
    pieces: list[_Piece] = []
    current: list[str | None] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            current.append(pattern[i + 1] if i + 1 < n else "\\")
            i += 2
            continue
        if ch == "%":
            pieces.append(tuple(current))
            current = []
        else:
            current.append(None if ch == "_" else ch)
        i += 1
    pieces.append(tuple(current))
    return pieces


def _piece_at(piece: _Piece, name: str, start: int) -> bool:
    if start + len(piece) > len(name):
        return False
    return all(p is None or p == name[start + k] for k, p in enumerate(piece))


def _find_piece(piece: _Piece, name: str, start: int) -> int:
    """The leftmost position >= start where ``piece`` matches, or -1."""
    if None not in piece:  # no ``_``: the C substring search
        return name.find("".join(piece), start)  # type: ignore[arg-type]
    for pos in range(start, len(name) - len(piece) + 1):
        if _piece_at(piece, name, pos):
            return pos
    return -1


def _like_match(pieces: list[_Piece], name: str) -> bool:
    first, middle, last = pieces[0], pieces[1:-1], pieces[-1]
    if len(first) + len(last) + sum(len(p) for p in middle) > len(name):
        return False
    if not _piece_at(first, name, 0):
        return False
    pos = len(first)
    for piece in middle:
        if not piece:
            continue
        found = _find_piece(piece, name, pos)
        if found < 0:
            return False
        pos = found + len(piece)
    end = len(name) - len(last)
    return end >= pos and _piece_at(last, name, end)


@dataclass(frozen=True)
class Statement:
    """What a statement or prepared statement handle carries: the SQL and the values bound to it.

    ``parameters`` is an Arrow IPC stream (one column per parameter, one row per execution), at most
    :data:`MAX_PARAMETER_BYTES` long, sealed by the server (:func:`encode_handle`). Handles are not secret:
    the statement is checked again on every use, under the caller's profile, exactly like one sent in the clear.
    """

    query: str
    parameters: bytes | None = None
    # a random id in the tickets GetFlightInfo hands out: CancelFlightInfo stops a running DoGet only for
    # the one who holds its ticket (the same SQL from another caller of the same user is another run)
    run: str | None = None
    # the ticket of one endpoint of a split result: {"dataset", "table", "spec"} - the partition of the
    # statement's one table that this endpoint reads (sealed with the statement, see encode_handle)
    partition: dict[str, Any] | None = None

    def values(self) -> pa.Table | None:
        """The bound values as a table, or None when nothing is bound."""
        if self.parameters is None:
            return None
        try:
            values = pa.ipc.open_stream(pa.py_buffer(self.parameters)).read_all()
            values.validate(full=True)
        except (pa.ArrowException, ValueError):
            raise InvalidRequest("not a statement handle issued by this server (its bound values do not decode)") from None
        return values


_SEAL_PURPOSE = b"statement handle values"
_PARTITION_SEAL_PURPOSE = b"statement handle partition"
#: the largest partition spec a ticket carries (a Delta partition names its files); a table whose
#: partitions name more is answered as one endpoint
MAX_PARTITION_BYTES = 256 << 10


def encode_handle(statement: Statement, signer: TicketSigner) -> bytes:
    """A handle for the statement; bound values and a partition are sealed (only values this server checked
    and wrote are ever decoded again: a forged handle could carry a compressed stream that inflates to
    gigabytes; and only partitions this server planned, for this statement over this dataset's table,
    ever reach a storage adapter: a forged one could name any file)."""
    body: dict[str, Any] = {"query": statement.query}
    if statement.run is not None:
        body["run"] = statement.run
    if statement.parameters is not None:
        body["parameters"] = base64.b64encode(statement.parameters).decode()
    if statement.partition is not None:
        body["partition"] = statement.partition
        body["seal"] = base64.b64encode(signer.seal(_PARTITION_SEAL_PURPOSE, _sealed(statement))).decode()
    elif statement.parameters is not None:
        body["seal"] = base64.b64encode(signer.seal(_SEAL_PURPOSE, _sealed(statement))).decode()
    return _HANDLE_PREFIX + json.dumps(body).encode()


def _sealed(statement: Statement) -> bytes:
    query, values = statement.query.encode("utf-8", "surrogatepass"), statement.parameters or b""
    if statement.partition is None:
        return query + b"\0" + values
    # the values' length first, so no other split of the bytes between values and partition reads the same
    return query + b"\0" + str(len(values)).encode() + b"\0" + values + b"\0" + _canonical(statement.partition)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# a handle: the statement in JSON (a character escaped as \uXXXX takes up to 12 bytes), bound values in
# base64 (4/3 of their size, plus IPC framing), and a partition (escaped like the statement)
_MAX_HANDLE_BYTES = MAX_QUERY_CHARS * 12 + MAX_PARAMETER_BYTES * 3 // 2 + MAX_PARTITION_BYTES * 6 + 1024


def _partition_of(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not (isinstance(value, dict) and set(value) == {"dataset", "table", "spec"} and isinstance(value["dataset"], str)
            and isinstance(value["table"], str) and isinstance(value["spec"], dict)):
        raise TypeError
    return value


def decode_handle(handle: bytes, signer: TicketSigner) -> Statement:
    if not handle.startswith(_HANDLE_PREFIX) or len(handle) > _MAX_HANDLE_BYTES:
        raise InvalidRequest("not a statement handle issued by this server")
    try:
        body = json.loads(handle[len(_HANDLE_PREFIX):])
        query, parameters, seal, run = body["query"], body.get("parameters"), body.get("seal"), body.get("run")
        if not isinstance(query, str) or not isinstance(parameters, (str, type(None))) \
                or not (run is None or (isinstance(run, str) and len(run) <= 64)):
            raise TypeError
        partition = _partition_of(body.get("partition"))
        raw = base64.b64decode(parameters, validate=True) if parameters is not None else None
        sealed = base64.b64decode(seal, validate=True) if isinstance(seal, str) else b""
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidRequest("not a statement handle issued by this server") from None
    statement = Statement(query, raw, run, partition)
    if partition is not None:
        if not signer.opens(_PARTITION_SEAL_PURPOSE, _sealed(statement), sealed):
            raise InvalidRequest("not a statement handle issued by this server (its partition is not sealed by it)")
    elif raw is not None and not signer.opens(_SEAL_PURPOSE, _sealed(statement), sealed):
        raise InvalidRequest("not a statement handle issued by this server (its bound values are not sealed by it)")
    return statement


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


def _a_run_of(statement: Statement) -> Statement:
    """The statement with a fresh run id, for the ticket of one GetFlightInfo."""
    return dataclasses.replace(statement, run=secrets.token_urlsafe(12))


def _ipc(values: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, values.schema) as writer:
        writer.write_table(values)
    return sink.getvalue().to_pybytes()


_INGEST = pb.CommandStatementIngest.TableDefinitionOptions


@dataclass(frozen=True)
class _RowWise:
    """The one table a statement reads row by row (it may run as one endpoint per partition of it)."""

    table: str
    filtered: bool  # it has a WHERE: how many rows it answers is unknown before it runs


class FlightSqlSurface:
    """Handlers of Flight SQL requests, given the domain services they use."""

    def __init__(self, catalog_name: str, catalog: Catalog, sql: SqlEngine, writer: Writer,
                 sessions: SessionStore | None = None, signer: TicketSigner | None = None,
                 endpoint_rows: int | None = None, locations: LocationRing | None = None,
                 uploads: Uploads | None = None) -> None:
        self.catalog_name = catalog_name
        self.uploads = uploads or Uploads()
        # a row-wise statement over a table of more rows than this is answered as one endpoint per partition
        # (server.sql_endpoint_rows; 0: never), naming the replicas (server.locations) round-robin, as plain
        # table reads do
        server = getattr(getattr(catalog, "project", None), "server", None)
        self.endpoint_rows = endpoint_rows if endpoint_rows is not None else getattr(server, "sql_endpoint_rows", 0)
        self.locations = locations if locations is not None else LocationRing(getattr(server, "locations", ()) or ())
        self.signer = signer if signer is not None else TicketSigner(secrets.token_bytes(32), 3600)
        self._bound = LastBound()
        self.sessions = sessions if sessions is not None else SessionStore()
        # (user, statement handle) -> a stop flag per DoGet of it now running (CancelFlightInfo sets them)
        self._running: dict[tuple[str, bytes], set[threading.Event]] = {}
        self._running_lock = threading.Lock()
        self.catalog = catalog
        self.sql = sql
        self.writer = writer
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

    def _encode(self, statement: Statement) -> bytes:
        return encode_handle(statement, self.signer)

    def _decode(self, handle: bytes) -> Statement:
        return decode_handle(handle, self.signer)

    def routes(self) -> dict[tuple[str, str], Handler]:
        """(RPC, message name) -> handler, for the server's one dispatch table."""
        routes: dict[tuple[str, str], Handler] = {}
        for message in self._metadata:
            name = message.DESCRIPTOR.name
            routes[("get_flight_info", name)] = self._metadata_info
            routes[("get_schema", name)] = self._metadata_schema
            routes[("do_get", name)] = self._metadata_get
        routes.update({
            ("get_flight_info", "CommandStatementQuery"): self._statement_info,
            ("get_schema", "CommandStatementQuery"): self._statement_schema,
            ("get_flight_info", "CommandPreparedStatementQuery"): self._prepared_info,
            ("get_schema", "CommandPreparedStatementQuery"): self._prepared_schema,
            ("do_put", "CommandPreparedStatementQuery"): self._prepared_bind,
            ("do_put", "CommandStatementUpdate"): self._read_only,
            ("do_put", "CommandPreparedStatementUpdate"): self._read_only,
            ("do_put", "CommandStatementSubstraitPlan"): self._read_only,
            ("do_get", "TicketStatementQuery"): self._statement_get,
            ("do_put", "CommandStatementIngest"): self._ingest,
            ("do_action", "CreatePreparedStatement"): self._create_prepared,
            ("do_action", "ClosePreparedStatement"): self._close_prepared,
            ("do_action", "SetSessionOptions"): self._set_session_options,
            ("do_action", "GetSessionOptions"): self._get_session_options,
            ("do_action", "CloseSession"): self._close_session,
            ("do_action", "CancelFlightInfo"): self._cancel_flight_info,
        })
        return routes

    @staticmethod
    def unsupported_action(name: str) -> Unsupported:
        return Unsupported(f"Flight SQL action {name} is not supported by this server; "
                           f"supported: {', '.join([*ACTION_BODIES, *RAW_ACTION_BODIES])}")

    # --- who and what -----------------------------------------------------------------------------
    @staticmethod
    def _info(schema: pa.Schema, descriptor: flight.FlightDescriptor, ticket: bytes) -> flight.FlightInfo:
        return flight.FlightInfo(schema, descriptor, [flight.FlightEndpoint(ticket, [])], -1, -1)

    # --- sessions: the current catalog and db_schema -------------------------------------------------
    def _session(self, call: Call) -> Session | None:
        return self.sessions.get(cookie_of(call.context), call.identity.user)

    def current_schema(self, call: Call) -> str | None:
        """The dataset the caller's session set as its current db_schema (None: no session, or not set)."""
        session = self._session(call)
        return session.options.get("schema") if session is not None else None

    def _set_session_options(self, call: Call, request: Request) -> Iterator[bytes]:
        """SetSessionOptions: ``catalog`` (the project) and ``schema`` (a dataset the caller sees).

        A value the server cannot take fails the call, saying why (nothing is set); an unknown
        option name is reported per option, as Flight.proto has it (the others are set).
        """
        wanted: dict[str, str | None] = {}
        result = fm.SetSessionOptionsResult()
        for name, value in request.message.session_options.items():
            if name not in SESSION_OPTIONS:
                result.errors[name[:100]].value = fm.SetSessionOptionsResult.INVALID_NAME
                continue
            kind = value.WhichOneof("option_value")
            if kind is None:
                wanted[name] = None  # an empty value erases the option
            elif kind != "string_value" or len(value.string_value) > MAX_OPTION_CHARS:
                raise InvalidRequest(f"session option '{name}' takes a name (a string)")
            else:
                wanted[name] = self._checked_option(call, name, value.string_value)
        if wanted:
            session_id = cookie_of(call.context)
            if session_id is None:
                raise InvalidRequest(
                    "session options need Flight's session cookie, and this call came without one: keep cookies "
                    "(ADBC: db_kwargs {\"adbc.flight.sql.rpc.with_cookie_middleware\": \"true\"}) or write "
                    "tables as dataset.table")
            session = self.sessions.get_or_create(session_id, call.identity.user)
            if session is None:
                raise InvalidRequest("this session cookie belongs to another user's session; reconnect")
            for name, text in wanted.items():
                if text is None:
                    session.options.pop(name, None)
                else:
                    session.options[name] = text
        return iter([result.SerializeToString()])

    def _checked_option(self, call: Call, name: str, value: str) -> str:
        if name == "catalog":
            if value != self.catalog_name:
                raise NotFound(f"Catalog '{value}' not found; the catalog is project {self.catalog_name}")
            return value
        visible = self.catalog.visible(call.profile)
        if value not in visible:
            raise NotFound(f"Dataset '{value}' not found; datasets: {', '.join(visible) or '(none)'}", dataset=value)
        return value

    def _get_session_options(self, call: Call, request: Request) -> Iterator[bytes]:
        result = fm.GetSessionOptionsResult()
        result.session_options["catalog"].string_value = self.catalog_name
        schema = self.current_schema(call)
        if schema is not None:
            result.session_options["schema"].string_value = schema
        return iter([result.SerializeToString()])

    def _close_session(self, call: Call, request: Request) -> Iterator[bytes]:
        self.sessions.close(cookie_of(call.context), call.identity.user)
        return iter([fm.CloseSessionResult(status=fm.CloseSessionResult.CLOSED).SerializeToString()])

    # --- metadata commands ------------------------------------------------------------------------
    def _metadata_info(self, call: Call, request: Request) -> flight.FlightInfo:
        schema_of, _ = self._metadata[type(request.message)]
        # the ticket is the command itself: DoGet answers it under the caller's profile then
        return self._info(schema_of(request.message), call.descriptor, call.descriptor.command)

    def _metadata_schema(self, call: Call, request: Request) -> flight.SchemaResult:
        return flight.SchemaResult(self._metadata[type(request.message)][0](request.message))

    def _metadata_get(self, call: Call, request: Request) -> flight.FlightDataStream:
        return flight.RecordBatchStream(self._metadata[type(request.message)][1](call, request.message))

    def _sql_info(self, call: Call, command: Any) -> pa.Table:
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
        wanted = list(command.info) or list(infos)
        return sql_info_table({i: infos[i] for i in wanted if i in infos})

    def _catalogs(self, call: Call, command: Any) -> pa.Table:
        return pa.Table.from_pylist([{"catalog_name": self.catalog_name}], schema=CATALOGS_SCHEMA)

    def _datasets(self, call: Call, catalog: str | None, pattern: str | None) -> list[str]:
        """The datasets the caller sees, narrowed by a catalog and a schema filter pattern."""
        if catalog is not None and catalog != self.catalog_name:
            return []
        matches = like(_checked_pattern(pattern, "db_schema_filter_pattern"))
        return sorted(d for d in self.catalog.visible(call.profile) if matches(d))

    def _db_schemas(self, call: Call, command: Any) -> pa.Table:
        catalog = command.catalog if command.HasField("catalog") else None
        pattern = command.db_schema_filter_pattern if command.HasField("db_schema_filter_pattern") else None
        rows = [{"catalog_name": self.catalog_name, "db_schema_name": d} for d in self._datasets(call, catalog, pattern)]
        return pa.Table.from_pylist(rows, schema=DB_SCHEMAS_SCHEMA)

    def _tables(self, call: Call, command: Any) -> pa.Table:
        catalog = command.catalog if command.HasField("catalog") else None
        pattern = command.db_schema_filter_pattern if command.HasField("db_schema_filter_pattern") else None
        matches = like(_checked_pattern(command.table_name_filter_pattern, "table_name_filter_pattern")
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

    # --- statements ---------------------------------------------------------------------------------
    def _prepare(self, call: Call, statement: Statement) -> tuple[Storage, CheckedQuery, pa.Table | None, _RowWise | None]:
        """The storage a statement reads, the statement checked and qualified by the sandbox, its
        bound values (checked against its placeholders; None when it has none), and the one table it
        reads row by row (:func:`row_wise_table`; None: it runs as one query)."""
        profile = call.profile
        query = statement.query
        tree = parse_statement(query, user=call.identity.user)  # once: the datasets, the placeholders and the check all read this tree
        datasets, unqualified = referenced_datasets(tree, user=call.identity.user)
        visible = self.catalog.visible(profile)
        current = self.current_schema(call)
        if current is not None and current not in visible:
            current = None  # the dataset went away (or the profile lost it) since the option was set
        if unqualified and current is None:
            raise InvalidRequest(
                f"qualify every table with its dataset, as dataset.table (unqualified: {', '.join(unqualified)}), "
                f"or set the current db_schema (SetSessionOptions, with cookies); "
                f"datasets: {', '.join(visible) or '(none)'}"
            )
        if unqualified:
            datasets = datasets | {current}
        if len(datasets) > 1:
            raise InvalidRequest(f"a statement reads one dataset; this one names {', '.join(sorted(datasets))}")
        if not datasets and not visible:
            raise NotFound(f"profile {profile} sees no dataset of project {self.catalog_name}")
        count = parameter_count(tree)
        values = statement.values()
        if values is not None:
            values = check_parameters(values, count)
        elif count:
            # the values travel in the handle the DoPut answers: clients that execute the handle they bound to
            # (flightsql-dbapi), or ask for the FlightInfo before binding (altertable-flightsql), end here
            raise InvalidRequest(f"the statement has {count} parameter(s) and no values are bound; bind them "
                                 "(DoPut CommandPreparedStatementQuery), then execute the handle that DoPut answers "
                                 "(DoPutPreparedStatementResult): this server keeps no statement state")
        dataset = next(iter(datasets)) if datasets else (current or visible[0])
        storage = self.catalog.open(profile, dataset)
        columns = {t: list(storage.table_columns(t)) for t in storage.readable_tables()}
        checked = check_query(tree, dataset, columns, catalog=self.catalog_name, user=call.identity.user)
        table = row_wise_table(tree)  # the checked tree: its one table is one of the dataset's
        row_wise = _RowWise(table, tree.args.get("where") is not None) \
            if table is not None and set(checked.tables) == {table} else None
        return storage, checked, values, row_wise

    def _query_schema(self, call: Call, statement: Statement) -> pa.Schema:
        storage, checked, values, _ = self._prepare(call, statement)
        return self.sql.schema(storage, checked, call.cancelled, values, user=call.identity.user)

    def _statement_info(self, call: Call, request: Request) -> flight.FlightInfo:
        command = request.message
        self._no_transaction(command)
        return self._statement_flight_info(call, Statement(command.query))

    def _statement_flight_info(self, call: Call, statement: Statement) -> flight.FlightInfo:
        """GetFlightInfo of a statement: one endpoint, or one per partition of the table a row-wise
        statement reads (each ticket seals the statement with its partition); endpoints name the
        replicas round-robin, and their order means nothing (``ordered=False``)."""
        statement = dataclasses.replace(statement, partition=None)  # a ticket's handle sent back: plan anew
        storage, checked, values, row_wise = self._prepare(call, statement)
        schema = self.sql.schema(storage, checked, call.cancelled, values, user=call.identity.user)
        run = _a_run_of(statement)
        if not self.endpoint_rows:
            row_wise = None  # splitting is off (server.sql_endpoint_rows): no partition plan either
        parts = storage.partitions(row_wise.table, self.endpoint_rows) if row_wise is not None else []
        specs = [{"dataset": checked.dataset, "table": row_wise.table, "spec": p.spec} for p in parts] \
            if row_wise is not None else []
        if row_wise is None or len(parts) <= 1 or any(len(_canonical(spec)) > MAX_PARTITION_BYTES for spec in specs):
            ticket = pack(pb.TicketStatementQuery(statement_handle=self._encode(run)))
            return self._info(schema, call.descriptor, ticket)
        locations = self.locations.assign(len(parts))
        endpoints = [flight.FlightEndpoint(
            pack(pb.TicketStatementQuery(statement_handle=self._encode(dataclasses.replace(run, partition=spec)))),
            locations[i]) for i, spec in enumerate(specs)]
        # rows are known when nothing filters them (and bound values do not run the query several times);
        # per endpoint they are estimates on some destinations, so no endpoint says its count
        total = sum(p.records for p in parts) if not row_wise.filtered and values is None else -1
        return flight.FlightInfo(schema, call.descriptor, endpoints, total, -1, ordered=False)

    def _statement_schema(self, call: Call, request: Request) -> flight.SchemaResult:
        return flight.SchemaResult(self._query_schema(call, Statement(request.message.query)))

    def _statement_get(self, call: Call, request: Request) -> flight.FlightDataStream:
        handle = request.message.statement_handle
        statement = self._decode(handle)
        storage, checked, values, row_wise = self._prepare(call, statement)
        partition = None
        if statement.partition is not None:
            # sealed with this statement, but planned for the dataset and table it read then: the session's
            # current dataset may have changed since (an unqualified table), and then it is not this one's
            if row_wise is None or statement.partition["dataset"] != checked.dataset \
                    or statement.partition["table"] != row_wise.table:
                raise InvalidRequest("this ticket's partition belongs to another dataset or table than its statement "
                                     "reads now; call GetFlightInfo again")
            partition = TablePartition(row_wise.table, statement.partition["spec"])
        # registered while it runs, so CancelFlightInfo (from any connection of the same user) can stop it
        key, stop = (call.identity.user, handle), threading.Event()
        with self._running_lock:
            self._running.setdefault(key, set()).add(stop)
        try:
            reader = self.sql.run(storage, checked, lambda: stop.is_set() or call.cancelled(), values,
                                  partition=partition, user=call.identity.user)
        except BaseException:
            self._unregister(key, stop)
            raise
        return call.stream(pa.RecordBatchReader.from_batches(reader.schema, self._until_done(reader, key, stop)))

    def _until_done(self, reader: pa.RecordBatchReader, key: tuple[str, bytes], stop: threading.Event) -> Iterator[pa.RecordBatch]:
        try:
            yield from reader
        finally:
            self._unregister(key, stop)

    def _unregister(self, key: tuple[str, bytes], stop: threading.Event) -> None:
        with self._running_lock:
            running = self._running.get(key)
            if running is not None:
                running.discard(stop)
                if not running:
                    del self._running[key]

    def _cancel_flight_info(self, call: Call, request: Request) -> Iterator[bytes]:
        """CancelFlightInfo: stop the caller's running DoGets of the FlightInfo's statement tickets.

        The answer is CANCELLED whether a query was running or had finished (nothing is kept about
        statements that do not run); only the caller's own queries are touched.
        """
        for endpoint in request.message.info.endpoint:
            wrapped = unpack_any(endpoint.ticket.ticket)
            if wrapped is None or short_name(wrapped.type_url) != pb.TicketStatementQuery.DESCRIPTOR.name:
                continue
            ticket = pb.TicketStatementQuery()
            try:
                ticket.ParseFromString(wrapped.value)
            except DecodeError:
                raise InvalidRequest("CancelFlightInfo: a ticket does not decode") from None
            with self._running_lock:
                running = list(self._running.get((call.identity.user, ticket.statement_handle), ()))
            for stop in running:
                stop.set()
        return iter([fm.CancelFlightInfoResult(status=fm.CANCEL_STATUS_CANCELLED).SerializeToString()])

    def _create_prepared(self, call: Call, request: Request) -> Iterator[bytes]:
        self._no_transaction(request.message)
        query = request.message.query
        count = parameter_count(query, user=call.identity.user)
        if count:
            # the result's schema before any value is bound: the parameters bound as NULLs
            nulls = pa.table([pa.nulls(1)] * count, schema=parameter_schema(count))
            schema = self._query_schema(call, Statement(query, _ipc(nulls)))
        else:
            schema = self._query_schema(call, Statement(query))
        result = pb.ActionCreatePreparedStatementResult(
            prepared_statement_handle=self._encode(Statement(query)),
            dataset_schema=schema.serialize().to_pybytes(),
            parameter_schema=parameter_schema(count).serialize().to_pybytes() if count else b"",
        )
        return iter([pack(result)])

    def _close_prepared(self, call: Call, request: Request) -> Iterator[bytes]:
        self._decode(request.message.prepared_statement_handle)  # stateless: nothing to free
        return iter([])

    def _with_last_bound(self, call: Call, handle: bytes) -> Statement:
        """The prepared statement of a handle; one without values takes those last bound to this very handle
        on this connection (clients that execute the handle they bound to, not the one the bind answered)."""
        statement = self._decode(handle)
        if statement.parameters is None:
            values = self._bound.recall(call.identity.user, call.context.peer(), handle)
            if values is not None:
                statement = dataclasses.replace(statement, parameters=values)
        return statement

    def _prepared_info(self, call: Call, request: Request) -> flight.FlightInfo:
        return self._statement_flight_info(call, self._with_last_bound(call, request.message.prepared_statement_handle))

    def _prepared_schema(self, call: Call, request: Request) -> flight.SchemaResult:
        return flight.SchemaResult(self._query_schema(call, self._with_last_bound(call, request.message.prepared_statement_handle)))

    def _prepared_bind(self, call: Call, request: Request) -> None:
        """DoPut(CommandPreparedStatementQuery): values to bind, one row per execution.

        The server keeps no state: the answer (``DoPutPreparedStatementResult``, raw in the PutResult's
        app_metadata) carries a new handle holding the statement and these values, which clients then
        execute (GetFlightInfo / DoGet). Several rows execute the statement once per row; the results
        of all rows, in row order, are one result (as Arrow's SQLite example server does).
        """
        statement = self._decode(request.message.prepared_statement_handle)
        batches, size = [], 0
        for batch in self.uploads.open(call, False).batches():  # a client that stops sending is ended when idle
            size += batch.nbytes
            if size > MAX_PARAMETER_BYTES:
                raise InvalidRequest(f"the bound values take more than {MAX_PARAMETER_BYTES:,} bytes; "
                                     "bind fewer rows per execution")
            batches.append(batch)
        if call.cancelled():
            raise Cancelled("the upload of bound values was cancelled")
        values = check_parameters(pa.Table.from_batches(batches, schema=call.reader.schema),
                                  parameter_count(statement.query, user=call.identity.user))
        bound = Statement(statement.query, _ipc(values))
        self._bound.remember(call.identity.user, call.context.peer(), request.message.prepared_statement_handle,
                             bound.parameters or b"")
        result = fm.DoPutPreparedStatementResult(prepared_statement_handle=self._encode(bound))
        call.writer.write(pa.py_buffer(result.SerializeToString()))

    @staticmethod
    def _read_only(call: Call, request: Request) -> None:
        raise Unsupported(f"{request.kind} is not supported: the server is read-only except bulk ingest "
                          "(CommandStatementIngest, adbc_ingest); statements are SELECT queries")

    @staticmethod
    def _no_transaction(command: Any) -> None:
        if command.HasField("transaction_id"):
            raise Unsupported("transactions are not supported; statements run on their own")

    # --- bulk ingest ------------------------------------------------------------------------------
    def _ingest(self, call: Call, request: Request) -> None:
        """CommandStatementIngest: the ingest options checked here, the rest is the one write path
        (:meth:`Writer.put`), exactly as for a DoPut."""
        command = request.message
        profile = call.profile
        self._no_transaction(command)
        if command.temporary:
            raise Unsupported("temporary tables are not supported; ingest into a table of a dataset")
        if command.options:
            raise Unsupported(f"ingest options are not supported: {', '.join(sorted(command.options))}")
        options = command.table_definition_options
        if options.if_not_exist == _INGEST.TABLE_NOT_EXIST_OPTION_UNSPECIFIED or \
                options.if_exists == _INGEST.TABLE_EXISTS_OPTION_UNSPECIFIED:
            raise InvalidRequest(
                "table_definition_options must set if_not_exist (CREATE or FAIL) and if_exists (FAIL, APPEND or "
                f"REPLACE); got if_not_exist={_INGEST.TableNotExistOption.Name(options.if_not_exist)}, "
                f"if_exists={_INGEST.TableExistsOption.Name(options.if_exists)}"
            )
        if command.HasField("catalog") and command.catalog != self.catalog_name:
            raise NotFound(f"Catalog '{command.catalog}' not found; the catalog is project {self.catalog_name}")
        # not the session's current db_schema: the dataset is named in the command (the dispatch evicts
        # the cache of the dataset the command names)
        if not command.HasField("schema") or not command.schema:
            visible = self.catalog.visible(profile)
            raise InvalidRequest(
                f"name the dataset to ingest into as the db_schema (datasets: {', '.join(visible) or '(none)'})"
            )
        must_exist = "ingest in create mode to add it" if options.if_not_exist == _INGEST.TABLE_NOT_EXIST_OPTION_FAIL else None
        must_be_new = "ingest in append or replace mode" if options.if_exists == _INGEST.TABLE_EXISTS_OPTION_FAIL else None
        disposition = "replace" if options.if_exists == _INGEST.TABLE_EXISTS_OPTION_REPLACE else "append"
        # the same write path as DoPut: name and type checks, contract, load (the dispatch evicts the cache)
        result = self.writer.put(profile, WriteCommand(command.schema, command.table, disposition), self.uploads.open(call, False),
                                 call.cancelled, must_exist=must_exist, must_be_new=must_be_new, user=call.identity.user)
        call.loaded(result)
        # DoPutUpdateResult goes back raw, not packed in Any
        call.writer.write(pa.py_buffer(pb.DoPutUpdateResult(record_count=result.rows).SerializeToString()))

