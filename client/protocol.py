"""The flight-share wire format: the one definition shared by server and client.

Everything a Flight client in any language needs to talk to a flight-share server lives here, and
nothing here imports dlt or duckdb (the client installs without them).

Descriptors
    ``FlightDescriptor.for_path(dataset, table)`` names a stored table. A *command* descriptor carries
    a JSON command (UTF-8), one of::

        {"v": 1, "op": "read",  "dataset": "d", "table": "t", "columns": ["a"], "limit": 10}
        {"v": 1, "op": "sql",   "dataset": "d", "query": "SELECT ..."}
        {"v": 1, "op": "write", "dataset": "d", "table": "t",
         "write_disposition": "append|replace|merge", "primary_key": ["id"], "commit_marker": true}

    ``columns`` and ``limit`` are optional. ``write`` commands are for DoPut only; without
    ``write_disposition`` a save follows the stored table (a ``merge`` table merges on its stored
    keys, any other table appends), and ``merge`` without ``primary_key`` uses the stored keys. With
    ``commit_marker`` the upload is stored only if its last message is a metadata-only message
    holding ``{"commit":true}`` (COMMIT_METADATA); otherwise a stream that ends normally is stored.

Tickets
    Opaque bytes returned in a FlightInfo endpoint; clients pass them back to DoGet unchanged.
    A large table read is split into several endpoints: each ticket is then a read command with a
    ``"partition"`` object (a Delta file group pinned to a table version, a PostgreSQL block range, a
    duckdb row-id range), readable on its own and on any replica. Endpoints are in table order: read
    them in parallel, concatenate in endpoint order. An endpoint's ``locations`` name the replica to
    read it from (empty: the server that answered GetFlightInfo); its ``app_metadata`` is JSON
    ``{"partition": i, "records": n}`` (:class:`EndpointMetadata`; n estimated where the destination
    only knows sizes).

Actions
    ``list-datasets`` -> one JSON result: ``{"project", "profile", "datasets": [DatasetInfo...]}``
                         (:class:`CatalogInfo`); the body (:class:`ListDatasetsRequest`) may name datasets
    ``health``        -> one JSON result: ``{"status": "ok", ...}``

Puts
    A DoPut answers one ``PutResult`` whose metadata is :class:`PutResult` JSON: ``{"load_info": {...}}``.

Authentication
    ``authorization: Basic <base64 user:password>`` on the Handshake (or any call) is answered with
    ``authorization: Bearer <token>`` in the response headers; every later call sends
    ``authorization: Bearer <token>`` (a server-issued JWT or a static API token). The legacy Flight
    handshake (``BasicAuth`` payload, token back in the stream, sent as ``auth-token-bin``) works too.
    Failures are UNAUTHENTICATED with :data:`AUTH_FAILED` (no hint whether the user exists).

Errors
    The gRPC status code says the kind (NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED,
    UNAUTHENTICATED, ...). The message is the user-facing text. Errors that carry fields (contract
    violations, permission errors) put ``{"error": <class name>, "message": <text>, "fields": {...}}``
    as JSON into the Flight ``extra_info`` bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

PROTOCOL_VERSION = 1

ACTION_LIST_DATASETS = "list-datasets"
ACTION_HEALTH = "health"
ACTIONS: dict[str, str] = {
    ACTION_LIST_DATASETS: "List the datasets the caller's profile may see, with their tables.",
    ACTION_HEALTH: "Report server health.",
}

# authentication (header names are lower case on the wire)
AUTH_HEADER = "authorization"
BEARER_PREFIX = "Bearer "
LEGACY_TOKEN_HEADER = "auth-token-bin"

# where clients find their server and credentials (client/environment.py resolves them)
DEFAULT_URL = "grpc://127.0.0.1:8815"
ENV_URL = "FLIGHT_SHARE_URL"
ENV_TOKEN = "FLIGHT_SHARE_TOKEN"
ENV_USERNAME = "FLIGHT_SHARE_USERNAME"
ENV_PASSWORD = "FLIGHT_SHARE_PASSWORD"
ENV_TOKEN_FILE = "FLIGHT_SHARE_TOKEN_FILE"
AUTH_REQUIRED = ("authentication required: connect with a user name and password, "
                 "or send a bearer token in the authorization header")
AUTH_FAILED = "authentication failed: unknown user, wrong password, or an invalid or expired token"

WriteDisposition = Literal["append", "replace", "merge"]
WRITE_DISPOSITIONS: tuple[str, ...] = ("append", "replace", "merge")

# the text pyarrow appends to a server error message on its way to a Python client
_PYARROW_DETAIL_MARK = ". Detail: "


class ProtocolError(ValueError):
    """A command, ticket or descriptor that does not follow this wire format."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class ReadCommand:
    """Read one table, optionally projected and limited."""

    dataset: str
    table: str
    columns: tuple[str, ...] | None = None
    limit: int | None = None
    partition: Mapping[str, Any] | None = None  # set by the server in tickets of split reads
    op: Literal["read"] = field(default="read", init=False)


@dataclass(frozen=True)
class SqlCommand:
    """Run one read-only SQL query over one dataset."""

    dataset: str
    query: str
    op: Literal["sql"] = field(default="sql", init=False)


@dataclass(frozen=True)
class WriteCommand:
    """Write (DoPut) a stream into one table of one dataset."""

    dataset: str
    table: str
    write_disposition: WriteDisposition | None = None  # None: as the stored table (merge tables merge)
    primary_key: tuple[str, ...] = ()
    # True: the server stores the upload only if the stream ends with COMMIT_METADATA, so a client
    # that fails half way through its own data cannot leave a partial write behind
    commit_marker: bool = False
    # the client's id of one save, the same on each retry of it: the server stores a save once per id (a
    # retry after a lost answer or a crash gets the first answer) - see SAVE_ID
    save_id: str | None = None
    op: Literal["write"] = field(default="write", init=False)


Command = ReadCommand | SqlCommand | WriteCommand

MAX_COMMAND_BYTES = 1 << 20
MAX_NAME_CHARS = 255
# columns a table may have after a save (stored + new ones, dlt's own included): PostgreSQL stops at 1,600,
# and dlt's schema handling slows every later save of a table with tens of thousands of columns
MAX_COLUMNS = 1000
MAX_LIMIT = (1 << 62) - 1


def encode_command(command: Command) -> bytes:
    """Serialise a command to its JSON wire form."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION}
    for key, value in asdict(command).items():
        if value is None or value == () or value is False:
            continue
        body[key] = list(value) if isinstance(value, tuple) else value
    return json.dumps(body, separators=(",", ":")).encode()


def _name(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"command key '{key}' must be a non-empty string", key)
    if len(value) > MAX_NAME_CHARS or "\x00" in value:
        raise ProtocolError(
            f"command key '{key}' must be at most {MAX_NAME_CHARS} characters without NUL", key
        )
    return value


def _names(body: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ProtocolError(f"command key '{key}' must be a list of column names", key)
    return tuple(value)


def decode_command(data: bytes) -> Command:
    """Parse a JSON command; raise ProtocolError naming the offending key."""
    if len(data) > MAX_COMMAND_BYTES:
        raise ProtocolError(f"command is {len(data)} bytes; at most {MAX_COMMAND_BYTES} allowed")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"command is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("command JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise ProtocolError("command must be a JSON object")
    version = body.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"command version {version!r} is not supported; this server speaks v{PROTOCOL_VERSION}", "v"
        )
    op = body.get("op")
    allowed = _ALLOWED_KEYS.get(op) if isinstance(op, str) else None
    if allowed is None:
        raise ProtocolError(f"command key 'op' must be one of {sorted(_ALLOWED_KEYS)}, got {op!r}", "op")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ProtocolError(
            f"unknown key(s) {unknown} in '{op}' command; allowed: {sorted(allowed)}", unknown[0]
        )
    if op == "read":
        limit = body.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= MAX_LIMIT):
            raise ProtocolError(f"command key 'limit' must be an integer from 0 to {MAX_LIMIT}", "limit")
        partition = body.get("partition")
        if partition is not None and not isinstance(partition, dict):
            raise ProtocolError("command key 'partition' must be a JSON object (from a ticket)", "partition")
        return ReadCommand(_name(body, "dataset"), _name(body, "table"), _names(body, "columns"), limit, partition)
    if op == "sql":
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ProtocolError("command key 'query' must be a non-empty SQL string", "query")
        return SqlCommand(_name(body, "dataset"), query)
    disposition = body.get("write_disposition")
    if disposition is not None and disposition not in WRITE_DISPOSITIONS:
        raise ProtocolError(
            f"command key 'write_disposition' must be one of {list(WRITE_DISPOSITIONS)}, got {disposition!r}",
            "write_disposition",
        )
    primary_key = _names(body, "primary_key") or ()
    commit_marker = body.get("commit_marker", False)
    if not isinstance(commit_marker, bool):
        raise ProtocolError("command key 'commit_marker' must be true or false", "commit_marker")
    save_id = body.get("save_id")
    if save_id is not None and (not isinstance(save_id, str) or not SAVE_ID.fullmatch(save_id)):
        raise ProtocolError("command key 'save_id' must be 1 to 64 letters, digits, '.', '_', ':' or '-'", "save_id")
    return WriteCommand(_name(body, "dataset"), _name(body, "table"), disposition, primary_key, commit_marker, save_id)


# a save's id (WriteCommand.save_id): chosen by the client, one per save call, reused on its retries
SAVE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


_ALLOWED_KEYS: dict[str, set[str]] = {
    "read": {"v", "op", "dataset", "table", "columns", "limit", "partition"},
    "sql": {"v", "op", "dataset", "query"},
    "write": {"v", "op", "dataset", "table", "write_disposition", "primary_key", "commit_marker", "save_id"},
}


def command_from_path(path: Sequence[bytes | str], op: Literal["read", "write"] = "read") -> Command:
    """Turn a path descriptor ``[dataset, table]`` into a read or write command."""
    parts = [p.decode("utf-8", "replace") if isinstance(p, bytes) else p for p in path]
    if len(parts) != 2:
        raise ProtocolError(f"a path descriptor must be [dataset, table], got {len(parts)} part(s)", "path")
    body = {"dataset": parts[0], "table": parts[1]}
    dataset, table = _name(body, "dataset"), _name(body, "table")
    return ReadCommand(dataset, table) if op == "read" else WriteCommand(dataset, table)


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset as the catalog shows it to a profile."""

    name: str
    destination: str
    destination_type: str
    location: str
    schema_name: str | None
    schema_version: int | None
    tables: tuple[str, ...]
    writable: bool
    error: str | None = None  # why the dataset cannot be served right now (the others still are)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tables"] = list(self.tables)
        if self.error is None:
            del d["error"]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DatasetInfo:
        return cls(
            name=d["name"],
            destination=d["destination"],
            destination_type=d["destination_type"],
            location=d["location"],
            schema_name=d.get("schema_name"),
            schema_version=d.get("schema_version"),
            tables=tuple(d.get("tables", ())),
            writable=bool(d.get("writable", False)),
            error=d.get("error"),
        )


@dataclass(frozen=True)
class CatalogInfo:
    """The answer to ``list-datasets``."""

    project: str
    profile: str
    datasets: tuple[DatasetInfo, ...]
    user: str | None = None  # the authenticated caller ("(anonymous)" without credentials)

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {"project": self.project, "profile": self.profile,
                                "datasets": [d.to_json() for d in self.datasets]}
        if self.user is not None:
            body["user"] = self.user
        return json.dumps(body).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> CatalogInfo:
        d = json.loads(data)
        return cls(d["project"], d["profile"], tuple(DatasetInfo.from_json(x) for x in d["datasets"]), d.get("user"))


@dataclass(frozen=True)
class ErrorDetail:
    """Structured error carried in Flight ``extra_info``."""

    error: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), default=str).encode()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> ErrorDetail | None:
        if not data:
            return None
        try:
            d = json.loads(data)
            return cls(str(d["error"]), str(d["message"]), dict(d.get("fields") or {}))
        except (ValueError, KeyError, TypeError):
            return None


def server_message(flight_message: str) -> str:
    """The server's own text from a pyarrow-decorated error message."""
    text = flight_message.split(_PYARROW_DETAIL_MARK, 1)[0]
    return text.strip()


# the app_metadata message that ends an upload sent with ``commit_marker: true``
COMMIT_METADATA = b'{"commit":true}'


@dataclass(frozen=True)
class ListDatasetsRequest:
    """The body of ``list-datasets``: empty for every dataset, or ``{"datasets": [names]}``."""

    datasets: tuple[str, ...] | None = None

    def to_bytes(self) -> bytes:
        return b"" if self.datasets is None else json.dumps({"datasets": list(self.datasets)}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ListDatasetsRequest:
        if not data:
            return cls()
        usage = 'list-datasets body must be empty or JSON like {"datasets": ["name"]}'
        if len(data) > MAX_COMMAND_BYTES:
            raise ProtocolError(usage, "datasets")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):
            raise ProtocolError(usage, "datasets") from None
        names = body.get("datasets") if isinstance(body, dict) else None
        if names is None:
            return cls()
        if not isinstance(names, list) or not all(isinstance(d, str) and 0 < len(d) <= MAX_NAME_CHARS for d in names):
            raise ProtocolError(usage, "datasets")
        return cls(tuple(names))


@dataclass(frozen=True)
class EndpointMetadata:
    """An endpoint's ``app_metadata`` in a split read: its position and (estimated) row count."""

    partition: int
    records: int

    def to_bytes(self) -> bytes:
        return json.dumps({"partition": self.partition, "records": self.records}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> EndpointMetadata:
        d = json.loads(data)
        return cls(int(d["partition"]), int(d["records"]))


@dataclass(frozen=True)
class PutResult:
    """The one ``PutResult.app_metadata`` message a save answers: ``{"load_info": {...}}`` (dlt's LoadInfo fields)."""

    load_info: Mapping[str, Any]

    def to_bytes(self) -> bytes:
        return json.dumps({"load_info": dict(self.load_info)}).encode()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> PutResult:
        d = json.loads(data) if data else {}
        if not isinstance(d, dict) or not isinstance(d.get("load_info"), dict):
            raise ProtocolError("the server's put result carries no load_info", "load_info")
        return cls(d["load_info"])
