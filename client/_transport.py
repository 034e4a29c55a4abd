"""The client's transport: one Flight connection with its credentials, parallel endpoint reads with
read-ahead, and puts that end with the commit marker. The user API (``client.catalog``) sits on top;
nothing here knows about datasets beyond the commands of ``client.protocol``."""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import random
import threading
import time
import warnings
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.flight as flight

from client import protocol
from client.errors import (
    AuthenticationError,
    DataValidationError,
    PipelineStepFailed,
    ServerUnavailableError,
    translate,
)
from client.load_info import LoadInfo
from client.protocol import Command, ErrorDetail, WriteCommand

PUT_BATCH_ROWS = 65_536
LOGIN_PATIENCE_SECONDS = 30.0  # how long a login retries a server busy checking other logins
PARALLEL_ENDPOINTS = 4  # endpoints of one read fetched at once
PREFETCH_BATCHES = 8  # batches buffered per endpoint ahead of the consumer (iter_batches)
_REUSE_CONNECTION = "arrow-flight-reuse-connection:"
_END = object()
_location_lock = threading.Lock()


class _Failed:
    """An exception raised while fetching an endpoint, passed to the consuming thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

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


def _server_said(exc: BaseException) -> bool:
    """Whether a failed call carries the server's own answer (its error detail), not a channel failure."""
    return ErrorDetail.from_bytes(getattr(exc, "extra_info", None)) is not None


class _Renewals(flight.ClientMiddlewareFactory):
    """Adopts the fresh bearer token the server sends in the headers of an answer (token renewal)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def start_call(self, info: flight.CallInfo) -> flight.ClientMiddleware:
        return _Renewal(self.connection)


class _Renewal(flight.ClientMiddleware):
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def received_headers(self, headers: dict[str, Any]) -> None:
        for value in headers.get(protocol.AUTH_HEADER, ()):
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if text.startswith(protocol.BEARER_PREFIX):
                token = text.removeprefix(protocol.BEARER_PREFIX)
                if token != self.connection._token and _token_expiry(token) is not None:
                    self.connection._adopt(token)  # a login's bearer, or a renewal


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
        self._renewals = _Renewals(self)
        middleware = [*(client_kwargs.pop("middleware", None) or []), self._renewals]
        self.client = flight.FlightClient(url, middleware=middleware, **client_kwargs)
        self._username = username
        self._password = password
        self._token = token
        self._expires: float | None = None
        self._login_lock = threading.Lock()
        if password is not None and url.startswith("grpc://") and not _is_loopback(urlsplit(url).hostname or ""):
            warnings.warn(f"sending a password over plaintext {url}; use grpc+tls://", stacklevel=3)
        self._client_kwargs = client_kwargs  # for the clients of replica locations (client_for)
        self.options = flight.FlightCallOptions()
        self._login()

    def _login(self) -> None:
        """Exchange user name and password for a bearer token (the Flight Handshake), or use a token.

        A server busy checking other logins (UNAVAILABLE, "busy") is asked again with backoff for up to
        :data:`LOGIN_PATIENCE_SECONDS`: a team's notebooks started together all get in."""
        if self._username is not None or self._password is not None:
            deadline, pause = time.monotonic() + LOGIN_PATIENCE_SECONDS, 0.1
            # Basic credentials on an ordinary call, not the Handshake: there the server knows the caller's
            # address, so guessing from elsewhere neither throttles nor queues this login (the server's
            # transport/logins.py); the bearer comes back in the answer's headers (adopted by _Renewals)
            basic = base64.b64encode(f"{self._username or ''}:{self._password or ''}".encode()).decode()
            login = flight.FlightCallOptions(headers=[(protocol.AUTH_HEADER.encode(), f"Basic {basic}".encode())])
            while True:
                try:
                    list(self.client.do_action(flight.Action(protocol.ACTION_LIST_DATASETS, b""), login))
                    break
                except (flight.FlightError, pa.ArrowException, OSError) as exc:
                    error = translate(exc)
                    if isinstance(error, AuthenticationError):
                        raise error from None
                    if _server_said(exc):  # the server answered: busy, or too many failed logins
                        retry_after = float(getattr(error, "fields", {}).get("retry_after") or pause)
                        if "busy" in str(error) and time.monotonic() + retry_after < deadline:
                            time.sleep(retry_after * random.uniform(1.0, 1.5))
                            pause = min(2 * pause, 2.0)
                            continue
                        raise error from None
                    # no answer from the server: the channel (address, TLS)
                    raise ServerUnavailableError(
                        f"cannot log in to {self.url}: {getattr(error, 'message', exc)} (is the address right, "
                        "and for grpc+tls:// does tls_root_certs name the server's CA?)") from None
            if self._token is None:  # no bearer: the anonymous profile (empty user name and password)
                self.options = flight.FlightCallOptions()
        elif self._token is not None:
            self._adopt(self._token)

    def _adopt(self, token: str) -> None:
        """Carry ``token`` from now on (after a login, or a renewal the server sent with an answer)."""
        self._token = token
        self._expires = _token_expiry(token)
        header = (protocol.AUTH_HEADER.encode(), (protocol.BEARER_PREFIX + token).encode())
        self.options = flight.FlightCallOptions(headers=[header])

    def _fresh(self) -> flight.FlightCallOptions:
        """Call options with a token that is not about to expire.

        The server renews a token past half its life in the headers of any answer (adopted by
        :class:`_Renewals`), so a connection in use never logs in again; one idle past its token's life logs
        in with its password - once, whichever of its threads asks first."""
        if self._expires is not None and self._password is not None and time.time() > self._expires - 30:
            with self._login_lock:
                if self._expires is not None and time.time() > self._expires - 30:
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

    def _endpoint_batches(self, endpoint: flight.FlightEndpoint) -> Generator[pa.RecordBatch, None, None]:
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
        buffers: list[queue.Queue[Any]] = [queue.Queue(PREFETCH_BATCHES) for _ in endpoints]
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
        stream ends without it and the server stores nothing. A connection lost (or never made) raises
        :class:`ServerUnavailableError` in our words (:func:`lost_connection`), with the fields ``save_id``
        and ``may_be_stored``: False while the upload was not wholly sent (the server stores nothing
        without its end), True once it was (the server may have stored it, or finish it at its restart).
        """
        command = replace(command, commit_marker=True)
        descriptor = flight.FlightDescriptor.for_command(protocol.encode_command(command))
        uploaded = False  # every batch, the commit marker and the end of the stream went out
        try:
            with _errors(**_context(command)):
                try:
                    writer, results = self.client.do_put(descriptor, reader.schema, self._fresh())
                    try:
                        for batch in _source(reader):
                            writer.write_batch(batch)
                        writer.write_metadata(pa.py_buffer(protocol.COMMIT_METADATA))
                        writer.done_writing()
                        uploaded = True
                        answer = results.read()
                    except _SourceFailed:
                        with contextlib.suppress(flight.FlightError, pa.ArrowException):
                            writer.close()  # no commit marker went out: the server stores nothing
                        raise
                    writer.close()
                except (flight.FlightError, pa.ArrowException, OSError) as exc:
                    if _connection_lost(exc):
                        raise _Lost() from None
                    raise
        except _SourceFailed as failed:
            raise failed.__cause__ from None  # type: ignore[misc]
        except _Lost:
            # gRPC's own words ("Socket closed", "failed to connect to all addresses ...") say nothing
            # the user can act on: say whether the save may be stored, and how to retry it safely
            raise lost_connection(self.url, command.save_id, uploaded, **_context(command)) from None
        except DataValidationError as exc:
            raise PipelineStepFailed.wrapping(exc, exc.fields.get("step", "extract"), exc.fields.get("load_id")) from exc
        return LoadInfo.from_json(protocol.PutResult.from_bytes(answer.to_pybytes() if answer is not None else None).load_info)

    def close(self) -> None:
        for client in self.__dict__.pop("_location_clients", {}).values():
            client.close()
        self.client.close()


#: gRPC's words for a connection the server closed while a call was open
_HUNG_UP = ("Socket closed", "Stream removed", "Connection reset")


class _Lost(Exception):
    """The connection to the server was lost, or could not be made, during a put."""


def _connection_lost(exc: BaseException) -> bool:
    """True for a failure of the connection itself - UNAVAILABLE without the server's error detail (the
    server's own UNAVAILABLE statuses always carry one), or gRPC's words for a closed stream - and not for
    a status the server sent."""
    if protocol.ErrorDetail.from_bytes(getattr(exc, "extra_info", None)) is not None:
        return False
    return isinstance(exc, flight.FlightUnavailableError) or any(mark in str(exc) for mark in _HUNG_UP)


def lost_connection(url: str, save_id: str | None, uploaded: bool, **fields: Any) -> ServerUnavailableError:
    """The error for a save whose connection was lost: before the upload was wholly sent nothing was saved
    (the server stores an upload only once its end arrived); after, the save may be stored - the server may
    have stored it before it went away, or finishes it when it starts again - and only a retry with the
    same ``save_id`` is safe."""
    again = f"save_id={save_id!r}" if save_id else "the same save_id"
    if not uploaded:
        text = (f"the server at {url} closed the connection (or could not be reached) while the save was uploading, "
                "so nothing was saved: it ends an upload that sends nothing for server.upload_idle_seconds (send "
                "the data as it is read, or read it into a table first), or it stopped or restarted; a retry with "
                f"{again} is stored once")
    else:
        text = (f"the connection to the server at {url} was lost after the save was uploaded, before the server "
                "answered, so the save may have been stored (a save the server had begun to load is finished when "
                f"it starts again): retry only with {again} (the error's save_id), which stores it once and answers "
                "as the first time if it was stored; a save with a new id could store the rows twice")
    return ServerUnavailableError(text, **fields, save_id=save_id, may_be_stored=uploaded)


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


def _context(command: Command) -> dict[str, Any]:
    context = {"dataset": command.dataset}
    table = getattr(command, "table", None)
    if table is not None:
        context["table"] = table
    return context


