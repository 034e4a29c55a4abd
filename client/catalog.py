"""The analyst's view: Catalog -> Dataset -> Table / Relation, read as pandas, Arrow or SQL.

Builder methods (``select``, ``limit``) return new relations; terminal methods (``arrow``, ``df``,
``iter_batches``) run the read. Item access (``catalog["name"]``) is canonical; attribute access is a
convenience that never hides a method.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import time
import warnings
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.flight as flight

from client import protocol
from client.errors import (AuthenticationError, DataValidationError, InvalidRequestError, NotFoundError,
                           PipelineStepFailed, ServerUnavailableError, translate)
from client.load_info import LoadInfo
from client.protocol import CatalogInfo, Command, DatasetInfo, ReadCommand, SqlCommand, WriteCommand

PUT_BATCH_ROWS = 65_536
PARALLEL_ENDPOINTS = 4  # endpoints of one read fetched at once
PREFETCH_BATCHES = 8  # batches buffered per endpoint ahead of the consumer (iter_batches)
_REUSE_CONNECTION = "arrow-flight-reuse-connection:"
_END = object()
_location_lock = threading.Lock()


class _Failed:
    """An exception raised while fetching an endpoint, passed to the consuming thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

if TYPE_CHECKING:
    import pandas


@contextlib.contextmanager
def _errors(**context: Any) -> Iterator[None]:
    try:
        yield
    except (flight.FlightError, pa.ArrowException, OSError) as exc:
        translated = translate(exc, **context)
        if translated is exc:
            raise
        raise translated from None


def _pem(value: Any) -> bytes | None:
    """PEM bytes from PEM text/bytes or a path to a PEM file."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and "-----BEGIN " in value:
        return value.encode()
    return Path(value).read_bytes()


def _token_expiry(token: str) -> float | None:
    """``exp`` of a JWT (read, not verified: the server verifies), None for other tokens."""
    try:
        payload = token.split(".")[1]
        return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class Connection:
    """A Flight client plus the call options every request carries (credentials included)."""

    def __init__(self, url: str, *, username: str | None = None, password: str | None = None,
                 token: str | None = None, **client_kwargs: Any) -> None:
        self.url = url
        for key in ("tls_root_certs", "cert_chain", "private_key"):
            if client_kwargs.get(key) is not None:
                client_kwargs[key] = _pem(client_kwargs[key])
        self.client = flight.FlightClient(url, **client_kwargs)
        self._username = username
        self._password = password
        self._token = token
        self._expires: float | None = None
        if password is not None and url.startswith("grpc://") and not _is_loopback(urlsplit(url).hostname or ""):
            warnings.warn(f"sending a password over plaintext {url}; use grpc+tls://", stacklevel=3)
        self._client_kwargs = client_kwargs  # for the clients of replica locations (client_for)
        self.options = flight.FlightCallOptions()
        self._login()

    def _login(self) -> None:
        """Exchange user name and password for a bearer token (the Flight Handshake), or use a token."""
        if self._username is not None or self._password is not None:
            try:
                _, value = self.client.authenticate_basic_token(self._username or "", self._password or "")
            except (flight.FlightError, pa.ArrowException, OSError) as exc:
                error = translate(exc)
                if isinstance(error, AuthenticationError):
                    raise error from None
                # the first call of a connection: a failure here is almost always the channel (TLS, address)
                raise ServerUnavailableError(
                    f"cannot log in to {self.url}: {getattr(error, 'message', exc)} (is the address right, and for "
                    "grpc+tls:// does tls_root_certs name the server's CA?)") from None
            self._token = value.decode().removeprefix(protocol.BEARER_PREFIX)
            self._expires = _token_expiry(self._token)
        if self._token is not None:
            header = (protocol.AUTH_HEADER.encode(), (protocol.BEARER_PREFIX + self._token).encode())
            self.options = flight.FlightCallOptions(headers=[header])

    def _fresh(self) -> flight.FlightCallOptions:
        """Call options with a token that is not about to expire (logs in again when it is)."""
        if self._expires is not None and self._password is not None and time.time() > self._expires - 30:
            self._login()
        return self.options

    def action(self, name: str, body: bytes = b"") -> bytes:
        with _errors():
            results = list(self.client.do_action(flight.Action(name, body), self._fresh()))
        return results[0].body.to_pybytes() if results else b""

    def flight_info(self, command: Command) -> flight.FlightInfo:
        descriptor = flight.FlightDescriptor.for_command(protocol.encode_command(command))
        with _errors(**_context(command)):
            return self.client.get_flight_info(descriptor, self._fresh())

    def schema(self, command: Command) -> pa.Schema:
        descriptor = flight.FlightDescriptor.for_command(protocol.encode_command(command))
        with _errors(**_context(command)):
            return self.client.get_schema(descriptor, self._fresh()).schema

    # --- endpoints: read in parallel, from the replica each one names, reassembled in order ----
    parallel_endpoints = PARALLEL_ENDPOINTS

    def client_for(self, endpoint: flight.FlightEndpoint) -> flight.FlightClient:
        """The client for an endpoint: the replica its location names (one cached client per
        location, same options and credentials), or this connection's server when it names none."""
        for location in endpoint.locations:
            uri = location.uri.decode() if isinstance(location.uri, bytes) else str(location.uri)
            if uri.startswith(_REUSE_CONNECTION) or uri.rstrip("/") == self.url.rstrip("/"):
                return self.client
            with _location_lock:
                clients = self.__dict__.setdefault("_location_clients", {})
                if uri not in clients:
                    clients[uri] = flight.FlightClient(uri, **self.__dict__.get("_client_kwargs", {}))
                return clients[uri]
        return self.client

    def _endpoint_batches(self, endpoint: flight.FlightEndpoint) -> Iterator[pa.RecordBatch]:
        """An endpoint's batches. Tickets do not depend on the replica that serves them, so when the
        named replica is unreachable before it sent anything, this connection's server is asked."""
        client = self.client_for(endpoint)
        started = False
        reader = None
        try:
            try:
                reader = client.do_get(endpoint.ticket, self._fresh())
                for chunk in reader:
                    started = True
                    yield chunk.data
            except flight.FlightUnavailableError:
                if started or client is self.client:
                    raise
                reader = self.client.do_get(endpoint.ticket, self._fresh())
                for chunk in reader:
                    yield chunk.data
            reader = None  # read to the end
        finally:
            if reader is not None:  # abandoned or failed: end the call rather than drain it
                reader.cancel()

    def _read_endpoint(self, endpoint: flight.FlightEndpoint) -> pa.Table:
        """An endpoint read whole (same fallback as :meth:`_endpoint_batches`)."""
        client = self.client_for(endpoint)
        try:
            return client.do_get(endpoint.ticket, self._fresh()).read_all()
        except flight.FlightUnavailableError:
            if client is self.client:
                raise
            return self.client.do_get(endpoint.ticket, self._fresh()).read_all()

    def batches(self, command: Command) -> Iterator[pa.RecordBatch]:
        """Stream a command's result in endpoint order; up to ``parallel_endpoints`` endpoints are
        fetched at once, each into a small bounded buffer, so memory stays bounded."""
        info = self.flight_info(command)
        endpoints = list(info.endpoints)
        if len(endpoints) <= 1 or self.parallel_endpoints <= 1:
            for endpoint in endpoints:
                with _errors(**_context(command)):
                    yield from self._endpoint_batches(endpoint)
            return
        yield from self._ordered(command, endpoints)

    def _ordered(self, command: Command, endpoints: list[flight.FlightEndpoint]) -> Iterator[pa.RecordBatch]:
        buffers = [queue.Queue(PREFETCH_BATCHES) for _ in endpoints]
        stop = threading.Event()

        def offer(i: int, item: Any) -> bool:
            """Put into endpoint i's buffer unless the consumer stopped (then False)."""
            while not stop.is_set():
                try:
                    buffers[i].put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def fetch(i: int) -> None:
            try:
                if stop.is_set():
                    return
                batches = self._endpoint_batches(endpoints[i])
                for batch in batches:
                    if not offer(i, batch):
                        batches.close()  # ends the DoGet stream
                        return
                offer(i, _END)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                offer(i, _Failed(exc))

        pool = ThreadPoolExecutor(min(self.parallel_endpoints, len(endpoints)), thread_name_prefix="flight-share-read")
        futures: list[Any] = []
        try:
            # FIFO: endpoint i starts before i+1, so the one being consumed is always running
            futures = [pool.submit(fetch, i) for i in range(len(endpoints))]
            for buffer in buffers:
                while True:
                    item = buffer.get()
                    if item is _END:
                        break
                    if isinstance(item, _Failed):
                        with _errors(**_context(command)):
                            raise item.error
                    yield item
        finally:
            stop.set()
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True)

    def table(self, command: Command) -> pa.Table:
        info = self.flight_info(command)
        endpoints = list(info.endpoints)

        def read(endpoint: flight.FlightEndpoint) -> pa.Table:
            with _errors(**_context(command)):
                return self._read_endpoint(endpoint)

        if len(endpoints) <= 1 or self.parallel_endpoints <= 1:
            tables = [read(e) for e in endpoints]
        else:
            with ThreadPoolExecutor(min(self.parallel_endpoints, len(endpoints)),
                                    thread_name_prefix="flight-share-read") as pool:
                tables = list(pool.map(read, endpoints))  # in endpoint order
        return pa.concat_tables(tables) if len(tables) != 1 else tables[0]

    def put(self, command: WriteCommand, reader: pa.RecordBatchReader) -> LoadInfo:
        """Stream batches with DoPut; a contract violation raises PipelineStepFailed like dlt.

        The upload ends with the protocol's commit marker: if the data source fails half way, the
        stream ends without it and the server stores nothing.
        """
        command = replace(command, commit_marker=True)
        descriptor = flight.FlightDescriptor.for_command(protocol.encode_command(command))
        try:
            with _errors(**_context(command)):
                writer, results = self.client.do_put(descriptor, reader.schema, self._fresh())
                try:
                    for batch in _source(reader):
                        writer.write_batch(batch)
                    writer.write_metadata(pa.py_buffer(protocol.COMMIT_METADATA))
                    writer.done_writing()
                    answer = results.read()
                except _SourceFailed:
                    with contextlib.suppress(flight.FlightError, pa.ArrowException):
                        writer.close()  # no commit marker went out: the server stores nothing
                    raise
                writer.close()
        except _SourceFailed as failed:
            raise failed.__cause__ from None  # type: ignore[misc]
        except DataValidationError as exc:
            raise PipelineStepFailed.wrapping(exc, exc.fields.get("step", "extract"), exc.fields.get("load_id")) from exc
        body = json.loads(answer.to_pybytes()) if answer is not None else {}
        return LoadInfo.from_json(body[protocol.PUT_RESULT_LOAD_INFO])

    def close(self) -> None:
        for client in self.__dict__.pop("_location_clients", {}).values():
            client.close()
        self.client.close()


class _SourceFailed(Exception):
    """The caller's own data source raised while a save was streaming it (``__cause__``)."""


def _source(reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
    """The reader's batches; an error from the source itself is marked so it is not taken for the server's."""
    batches = iter(reader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - re-raised unchanged by Connection.put
            raise _SourceFailed() from exc
        yield batch


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


def _context(command: Command) -> dict[str, Any]:
    context = {"dataset": command.dataset}
    table = getattr(command, "table", None)
    if table is not None:
        context["table"] = table
    return context


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

    def df(self) -> "pandas.DataFrame":
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

    def select(self, *columns: str) -> "Table":
        """Only these columns."""
        return replace(self, _command=replace(self._command, columns=tuple(columns)))

    def limit(self, n: int) -> "Table":
        """At most n rows."""
        return replace(self, _command=replace(self._command, limit=int(n)))

    def head(self, n: int = 5) -> "pandas.DataFrame":
        """The first n rows as pandas."""
        return self.limit(n).df()

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

    def refresh(self) -> "Dataset":
        """Re-read this dataset's tables and schema version from the server."""
        body = json.dumps({"datasets": [self.name]}).encode()
        info = CatalogInfo.from_bytes(self._connection.action(protocol.ACTION_LIST_DATASETS, body))
        self._info = info.datasets[0]
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

    def sql(self, query: str) -> Relation:
        """A read-only SQL query over this dataset's tables."""
        return Relation(self._connection, SqlCommand(self.name, query))

    def save(self, data: Any, table_name: str, write_disposition: str = "append",
             primary_key: str | list[str] | None = None) -> LoadInfo:
        """Write data into a table of this dataset under the profile's contract; returns the load info."""
        keys = (primary_key,) if isinstance(primary_key, str) else tuple(primary_key or ())
        command = WriteCommand(self.name, table_name, write_disposition, keys)  # type: ignore[arg-type]
        try:  # the server's own validation, before any data moves
            protocol.decode_command(protocol.encode_command(command))
        except protocol.ProtocolError as exc:
            raise InvalidRequestError(str(exc), dataset=self.name, table=table_name) from None
        info = self._connection.put(command, as_reader(data))
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

    def _load(self) -> CatalogInfo:
        return CatalogInfo.from_bytes(self._connection.action(protocol.ACTION_LIST_DATASETS))

    def refresh(self) -> "Catalog":
        """Re-read the dataset list from the server."""
        self._info = self._load()
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
                return Dataset(self._connection, info).refresh()
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

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __str__(self) -> str:
        lines = [f"Datasets in project {self.project} for profile {self.profile}:"]
        lines += [f"{d.name}@{d.destination}[{d.location}]" for d in self._info.datasets]
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


def connect(url: str = "grpc://127.0.0.1:8815", *, username: str | None = None, password: str | None = None,
            token: str | None = None, tls_root_certs: Any = None, cert_chain: Any = None, private_key: Any = None,
            **client_kwargs: Any) -> Catalog:
    """Open the catalog of a flight-share server.

    Credentials: ``username``/``password`` (exchanged for a bearer token by the Flight handshake and
    renewed before it expires) or ``token`` (a static API token or a JWT); without either,
    ``$FLIGHT_SHARE_TOKEN``, then ``$FLIGHT_SHARE_USERNAME``/``$FLIGHT_SHARE_PASSWORD``; without any,
    the call is anonymous. TLS (``grpc+tls://``): ``tls_root_certs`` to trust the server's CA, and
    ``cert_chain``/``private_key`` for mutual TLS — each PEM bytes/text or a path to a PEM file.
    Other keyword arguments go to ``pyarrow.flight.FlightClient``.
    """
    if username is None and password is None and token is None:
        token = os.environ.get(protocol.ENV_TOKEN) or None
        if token is None:
            username = os.environ.get(protocol.ENV_USERNAME) or None
            password = os.environ.get(protocol.ENV_PASSWORD) if username is not None else None
    if (username is None) != (password is None):
        raise ValueError("give both username and password (or a token)")
    if token is not None and username is not None:
        raise ValueError("give either username/password or token, not both")
    for key, value in (("tls_root_certs", tls_root_certs), ("cert_chain", cert_chain), ("private_key", private_key)):
        if value is not None:
            client_kwargs[key] = value
    return Catalog(Connection(url, username=username, password=password, token=token, **client_kwargs))
