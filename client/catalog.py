"""The analyst's view: Catalog -> Dataset -> Table / Relation, read as pandas, Arrow or SQL.

Builder methods (``select``, ``limit``) return new relations; terminal methods (``arrow``, ``df``,
``iter_batches``) run the read. Item access (``catalog["name"]``) is canonical; attribute access is a
convenience that never hides a method.
"""

from __future__ import annotations

import html
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from client import protocol
from client._transport import PUT_BATCH_ROWS, Connection
from client.environment import ConnectionSettings, resolve
from client.errors import (
    InvalidRequestError,
    NotFoundError,
    ServerUnavailableError,
    UsageError,
)
from client.load_info import LoadInfo
from client.protocol import (
    CatalogInfo,
    DatasetInfo,
    ReadCommand,
    SqlCommand,
    WriteCommand,
)

if TYPE_CHECKING:
    import pandas


def as_reader(data: Any) -> pa.RecordBatchReader:
    """pandas, pyarrow (Table, RecordBatch, reader), polars or any Arrow stream as a batch reader."""
    if isinstance(data, pa.RecordBatchReader):
        return data
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        return pa.RecordBatchReader.from_batches(data.schema, data.to_batches(max_chunksize=PUT_BATCH_ROWS))
    if type(data).__module__.startswith("pandas"):
        table = pa.Table.from_pandas(data, preserve_index=False)
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=PUT_BATCH_ROWS))
    if hasattr(data, "__arrow_c_stream__"):
        return pa.RecordBatchReader.from_stream(data)
    if isinstance(data, (list, tuple)) and data and all(isinstance(b, pa.RecordBatch) for b in data):
        return pa.RecordBatchReader.from_batches(data[0].schema, data)
    raise TypeError(
        f"cannot save a {type(data).__name__}: pass a pandas or polars DataFrame, a pyarrow Table, "
        "RecordBatch, RecordBatchReader or list of RecordBatches"
    )


@dataclass(frozen=True)
class Relation:
    """A readable result: a table (optionally projected/limited) or a SQL query."""

    _connection: Connection
    _command: ReadCommand | SqlCommand

    @property
    def schema(self) -> pa.Schema:
        """Arrow schema, without reading data."""
        return self._connection.schema(self._command)

    def arrow(self) -> pa.Table:
        """Read everything into a pyarrow Table."""
        return self._connection.table(self._command)

    def df(self) -> pandas.DataFrame:
        """Read everything into a pandas DataFrame."""
        return self.arrow().to_pandas()

    def iter_batches(self) -> Iterator[pa.RecordBatch]:
        """Stream record batches as the server sends them."""
        return self._connection.batches(self._command)

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        """Arrow PyCapsule stream protocol, so polars/duckdb/pyarrow can read a relation directly."""
        reader = pa.RecordBatchReader.from_batches(self.schema, self.iter_batches())
        return reader.__arrow_c_stream__(requested_schema)


@dataclass(frozen=True)
class Table(Relation):
    """One stored table."""

    _command: ReadCommand

    @property
    def name(self) -> str:
        return self._command.table

    def select(self, *columns: str) -> Table:
        """Only these columns."""
        return replace(self, _command=replace(self._command, columns=tuple(columns)))

    def limit(self, n: int) -> Table:
        """At most n rows."""
        return replace(self, _command=replace(self._command, limit=int(n)))

    def head(self, n: int = 5) -> pandas.DataFrame:
        """The first n rows as pandas."""
        return self.limit(n).df()

    def where(self, column_or_expr: str, operator: str | None = None, value: Any = None) -> Query:
        """Rows that match, as dlt's ``Relation.where``: ``where("id", "gt", 10)`` (operators eq, ne, gt, lt,
        gte, lte, in, not_in; ``eq``/``ne`` with None mean IS [NOT] NULL) or a SQL condition,
        ``where("id > 10")``. The server pushes plain filters to the destination."""
        return self._query().where(column_or_expr, operator, value)

    def order_by(self, column_name: str, direction: str = "asc") -> Query:
        """Rows in this order, as dlt's ``Relation.order_by``."""
        return self._query().order_by(column_name, direction)

    def _query(self) -> Query:
        return Query.of(self._connection, self._command.dataset, self.name, tuple(self._command.columns or ()),
                        limit=self._command.limit)

    def row_count(self) -> int:
        """Rows in the table, as the destination reports them."""
        return self._connection.flight_info(self._command).total_records

    def __str__(self) -> str:
        return f"Table {self._command.dataset}.{self.name}\n{self.schema}"

    def __repr__(self) -> str:
        return f"<Table {self._command.dataset}.{self.name}>"

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(f.name)}</td><td>{html.escape(str(f.type))}</td></tr>" for f in self.schema)
        return (f"<b>Table {html.escape(self._command.dataset)}.{html.escape(self.name)}</b>"
                f"<table><tr><th>column</th><th>type</th></tr>{rows}</table>")


_OPERATORS = {"eq": "=", "ne": "<>", "gt": ">", "lt": "<", "gte": ">=", "lte": "<="}


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: Any) -> str:
    """A value as SQL text (duckdb's dialect, which the server's sandbox speaks)."""
    import datetime
    import decimal
    import math

    if value is None:
        return "NULL"
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # a numpy scalar: its Python value
        value = value.item()
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot filter on {value!r}: use a SQL condition, e.g. where(\"isnan(col)\")")
        return repr(value)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise ValueError(f"cannot filter on {value!r}: use a SQL condition")
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, datetime.datetime):
        return f"TIMESTAMP{'TZ' if value.tzinfo else ''} '{value.isoformat()}'"
    if isinstance(value, datetime.date):
        return f"DATE '{value.isoformat()}'"
    raise TypeError(f"cannot filter on a {type(value).__name__}: use a number, string, bool, date or datetime")


@dataclass(frozen=True)
class Query(Relation):
    """A table filtered and ordered (the shape of dlt's ``Relation.where`` / ``order_by``): one SELECT run by the
    server's SQL sandbox, which pushes plain filters and the limit down to the destination."""

    _command: SqlCommand  # always SQL (Query.of builds it); the field keeps its place in the dataclass
    _table: str = ""
    _columns: tuple[str, ...] = ()
    _conditions: tuple[str, ...] = ()
    _order: tuple[str, ...] = ()
    _limit: int | None = None

    @classmethod
    def of(cls, connection: Connection, dataset: str, table: str, columns: tuple[str, ...] = (),
           conditions: tuple[str, ...] = (), order: tuple[str, ...] = (), limit: int | None = None) -> Query:
        sql = f"SELECT {', '.join(map(_identifier, columns)) or '*'} FROM {_identifier(table)}"
        if conditions:
            sql += " WHERE " + " AND ".join(f"({c})" for c in conditions)
        if order:
            sql += " ORDER BY " + ", ".join(order)
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return cls(connection, SqlCommand(dataset, sql), table, columns, conditions, order, limit)

    def _with(self, **changes: Any) -> Query:
        fields: dict[str, Any] = {"columns": self._columns, "conditions": self._conditions, "order": self._order, "limit": self._limit}
        fields.update(changes)
        return Query.of(self._connection, self._command.dataset, self._table, **fields)

    def where(self, column_or_expr: str, operator: str | None = None, value: Any = None) -> Query:
        if operator is None and value is None:
            return self._with(conditions=(*self._conditions, column_or_expr))
        if operator in ("in", "not_in"):
            values = list(value) if isinstance(value, (list, tuple, set, frozenset, range)) else [value]
            if not values:  # IN () is no SQL: nothing is in an empty list
                condition = "FALSE" if operator == "in" else "TRUE"
            else:
                condition = f"{_identifier(column_or_expr)} {'NOT IN' if operator == 'not_in' else 'IN'} " \
                            f"({', '.join(map(_literal, values))})"
        elif operator in _OPERATORS:
            if value is None and operator in ("eq", "ne"):
                condition = f"{_identifier(column_or_expr)} IS {'NOT ' if operator == 'ne' else ''}NULL"
            else:
                condition = f"{_identifier(column_or_expr)} {_OPERATORS[operator]} {_literal(value)}"
        else:
            raise ValueError(f"operator {operator!r} is not one of {', '.join([*_OPERATORS, 'in', 'not_in'])}")
        return self._with(conditions=(*self._conditions, condition))

    def order_by(self, column_name: str, direction: str = "asc") -> Query:
        if direction.lower() not in ("asc", "desc"):
            raise ValueError(f"direction must be 'asc' or 'desc', got {direction!r}")
        return self._with(order=(*self._order, f"{_identifier(column_name)} {direction.upper()}"))

    def select(self, *columns: str) -> Query:
        return self._with(columns=tuple(columns))

    def limit(self, n: int) -> Query:
        return self._with(limit=int(n))

    def head(self, n: int = 5) -> pandas.DataFrame:
        return self.limit(n).df()

    def __repr__(self) -> str:
        return f"<Query {self._command.dataset}: {self._command.query}>"


class Dataset:
    """One dataset of the catalog."""

    def __init__(self, connection: Connection, info: DatasetInfo) -> None:
        self._connection = connection
        self._info = info

    @property
    def name(self) -> str:
        return self._info.name

    @property
    def info(self) -> DatasetInfo:
        return self._info

    @property
    def tables(self) -> list[str]:
        return list(self._info.tables)

    def refresh(self) -> Dataset:
        """Re-read this dataset's tables and schema version from the server."""
        body = protocol.ListDatasetsRequest((self.name,)).to_bytes()
        info = CatalogInfo.from_bytes(self._connection.action(protocol.ACTION_LIST_DATASETS, body)).datasets[0]
        if info.error is not None:
            raise ServerUnavailableError(info.error, dataset=self.name)
        self._info = info
        return self

    def table(self, name: str) -> Table:
        if name not in self._info.tables:
            self.refresh()
        if name not in self._info.tables:
            raise NotFoundError(
                f"Table '{name}' not found in dataset '{self.name}'; tables: {', '.join(self._info.tables) or '(none)'}",
                dataset=self.name, table=name,
            )
        return Table(self._connection, ReadCommand(self.name, name))

    def __getitem__(self, name: str) -> Table:
        return self.table(name)

    def __getattr__(self, name: str) -> Table:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self.table(name)
        except NotFoundError as exc:
            raise AttributeError(str(exc)) from None

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._info.tables))

    def __iter__(self) -> Iterator[Table]:
        return (self.table(t) for t in self._info.tables)

    def loads(self) -> Table:
        """dlt's load history of this dataset (``_dlt_loads``: load_id, schema_name, status, inserted_at,
        schema_version_hash), read-only; also readable in SQL as ``_dlt_loads``."""
        return Table(self._connection, ReadCommand(self.name, "_dlt_loads"))

    def sql(self, query: str) -> Relation:
        """A read-only SQL query over this dataset's tables."""
        return Relation(self._connection, SqlCommand(self.name, query))

    def save(self, data: Any, table_name: str, write_disposition: str | None = None,
             primary_key: str | list[str] | None = None, save_id: str | None = None) -> LoadInfo:
        """Write data into a table of this dataset under the profile's contract; returns the load info.

        Without ``write_disposition`` the save follows the stored table: a ``merge`` table merges on its
        stored primary key, any other table (and a new one) appends. ``merge`` without ``primary_key``
        uses the stored key.

        Each call sends a ``save_id`` (a fresh one unless given): the server stores a save once per id and
        user, so a save whose answer was lost (the connection or the server went away:
        ``ServerUnavailableError``, whose ``save_id`` field names it and whose ``may_be_stored`` field says
        whether the upload was wholly sent) may be sent again with the same ``save_id`` and is not stored
        twice. An id reused for a different save (another write disposition, primary key, columns or row
        count) is refused with ``InvalidRequestError``. Data that can be sent again (a table, a DataFrame,
        record batches) is retried once by itself after a lost connection, with the same id, and after a
        refusal because another save changed the same table at the same moment (nothing of it was written;
        it is checked again)."""
        keys = (primary_key,) if isinstance(primary_key, str) else tuple(primary_key or ())
        command = WriteCommand(self.name, table_name, write_disposition, keys,  # type: ignore[arg-type]
                               save_id=save_id or uuid.uuid4().hex)
        try:  # the server's own validation, before any data moves
            protocol.decode_command(protocol.encode_command(command))
        except protocol.ProtocolError as exc:
            raise InvalidRequestError(str(exc), dataset=self.name, table=table_name) from None
        replayable = isinstance(data, (pa.Table, pa.RecordBatch, list, tuple)) or \
            type(data).__module__.startswith(("pandas", "polars"))  # a reader or stream is read once
        earlier: ServerUnavailableError | None = None  # the first attempt's error, when it is retried
        for attempt in (1, 2):
            try:
                info = self._connection.put(command, as_reader(data))
                break
            except ServerUnavailableError as exc:
                exc.fields.setdefault("save_id", command.save_id)
                exc.save_id = command.save_id  # type: ignore[attr-defined]
                if earlier is not None and earlier.fields.get("may_be_stored"):
                    # the first attempt may be stored: that is what the user must hear, not the resend's fate
                    resend = ("could not reach the server either" if "may_be_stored" in exc.fields
                              else f"failed too: {exc.message}")
                    raise ServerUnavailableError(f"{earlier.message} (a resend with this save_id {resend})",
                                                 **earlier.fields) from None
                # a lost connection may have stored it (the same id makes that safe); a save refused because
                # another changed the same table at the same time stored nothing and is checked anew
                conflict = exc.fields.get("retry") == "conflict"
                if attempt == 2 or not replayable or ("nothing was written" in exc.message and not conflict):
                    raise
                earlier = exc
        self.refresh()
        return info

    def row_counts(self) -> dict[str, int]:
        """Rows per table."""
        return {t: self.table(t).row_count() for t in self._info.tables}

    def __str__(self) -> str:
        if self._info.schema_version is None:
            schema = f"{self._info.schema_name or self.name} (nothing stored yet)"
        else:
            schema = f"{self._info.schema_name}@v{self._info.schema_version}"
        lines = [f"Dataset {self.name} tables in logical schema {schema}", *self._info.tables]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Dataset {self.name}@{self._info.destination}>"

    def _repr_html_(self) -> str:
        items = "".join(f"<li>{html.escape(t)}</li>" for t in self._info.tables)
        return f"<b>{html.escape(str(self).splitlines()[0])}</b><ul>{items}</ul>"


class Catalog:
    """The datasets a profile may see on one flight-share server."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._info = self._load()
        # one Dataset per name: `catalog.ds` costs no round trip, and what a save refreshed is what
        # the next `catalog.ds` shows
        self._datasets: dict[str, Dataset] = {}

    def _load(self) -> CatalogInfo:
        return CatalogInfo.from_bytes(self._connection.action(protocol.ACTION_LIST_DATASETS))

    def refresh(self) -> Catalog:
        """Re-read the dataset list from the server."""
        self._info = self._load()
        self._datasets.clear()
        return self

    @property
    def project(self) -> str:
        return self._info.project

    @property
    def profile(self) -> str:
        """The profile the server assigned to this connection's user."""
        return self._info.profile

    @property
    def user(self) -> str | None:
        """The user the server authenticated (``(anonymous)`` without credentials)."""
        return self._info.user

    @property
    def datasets(self) -> list[str]:
        return [d.name for d in self._info.datasets]

    def dataset(self, name: str) -> Dataset:
        for info in self._info.datasets:
            if info.name == name:
                if info.error is not None:  # listed, but its destination cannot be read right now
                    raise ServerUnavailableError(info.error, dataset=name)
                if name not in self._datasets:
                    self._datasets[name] = Dataset(self._connection, info)
                return self._datasets[name]
        raise NotFoundError(
            f"Dataset '{name}' not found in project {self.project} for profile {self.profile}; "
            f"datasets: {', '.join(self.datasets) or '(none)'}",
            dataset=name,
        )

    def __getitem__(self, name: str) -> Dataset:
        return self.dataset(name)

    def __getattr__(self, name: str) -> Dataset:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self.dataset(name)
        except NotFoundError as exc:
            raise AttributeError(str(exc)) from None

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.datasets))

    def __iter__(self) -> Iterator[Dataset]:
        return (self.dataset(n) for n in self.datasets)

    def health(self) -> dict[str, Any]:
        return json.loads(self._connection.action(protocol.ACTION_HEALTH))

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __str__(self) -> str:
        lines = [f"Datasets in project {self.project} for profile {self.profile}:"]
        lines += [f"{d.name}@{d.destination}[{d.location}]" + (" (unavailable)" if d.error else "")
                  for d in self._info.datasets]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Catalog {self.project} user={self.user} profile={self.profile} url={self._connection.url}>"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(d.name)}</td><td>{html.escape(d.destination)}</td><td>{html.escape(d.location)}</td>"
            f"<td>{len(d.tables)}</td></tr>"
            for d in self._info.datasets
        )
        return (f"<b>Datasets in project {html.escape(self.project)} for profile {html.escape(self.profile)}</b>"
                f"<table><tr><th>dataset</th><th>destination</th><th>location</th><th>tables</th></tr>{rows}</table>")


def connect(url: str | None = None, *, username: str | None = None, password: str | None = None,
            token: str | None = None, token_file: str | Path | None = None, tls_root_certs: Any = None,
            cert_chain: Any = None, private_key: Any = None, **client_kwargs: Any) -> Catalog:
    """Open the catalog of a flight-share server.

    Address and credentials resolve as the command line resolves them (:func:`client.environment.resolve`):
    the arguments, then ``$FLIGHT_SHARE_URL`` / ``$FLIGHT_SHARE_TOKEN`` / ``$FLIGHT_SHARE_USERNAME`` and
    ``$FLIGHT_SHARE_PASSWORD``, then a token file (``token_file``, ``$FLIGHT_SHARE_TOKEN_FILE``); without
    any, the call is anonymous. ``username``/``password`` are exchanged for a bearer token by the Flight
    handshake and renewed before it expires; ``token`` is a static API token or a JWT. TLS
    (``grpc+tls://``): ``tls_root_certs`` to trust the server's CA, and ``cert_chain``/``private_key`` for
    mutual TLS — each PEM bytes/text or a path to a PEM file. Other keyword arguments go to
    ``pyarrow.flight.FlightClient``.
    """
    if (username is None) != (password is None):
        raise UsageError("give both username and password (or a token)")
    if token is not None and username is not None:
        raise UsageError("give either username/password or token, not both")
    settings = resolve(url, token=token, username=username, password=password, token_file=token_file)
    for key, value in (("tls_root_certs", tls_root_certs), ("cert_chain", cert_chain), ("private_key", private_key)):
        if value is not None:
            client_kwargs[key] = value
    return Catalog(Connection(settings.url, **settings.credentials, **client_kwargs))


def open_catalog(settings: ConnectionSettings, **client_kwargs: Any) -> Catalog:
    """``connect`` with settings already resolved (the command line and data packages)."""
    return connect(settings.url, **settings.credentials, **client_kwargs)
