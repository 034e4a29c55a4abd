"""The Flight RPC surface: decode the request, ask the rooms, encode the answer.

No business logic lives here. Every handler runs inside :func:`_rpc`, the one place where domain
errors become Flight statuses (:func:`flight_server.errors.to_flight_error`). Who calls is settled
by the middleware from :mod:`flight_server.auth` before a handler runs (:meth:`identity_of`);
tickets are signed and bound to that caller (:mod:`flight_server.tickets`); SQL runs in the sandbox
(:mod:`flight_server.sql`); every call leaves one audit line (:mod:`flight_server.audit`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
from typing import Any, Callable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from client import protocol
from client.load_info import LoadInfo
from client.protocol import Command, ReadCommand, SqlCommand, WriteCommand
from flight_server import audit
from flight_server.auth import Identity, Security
from flight_server.catalog import Catalog
from flight_server.config import ProjectConfig
from flight_server.errors import InvalidRequest, Unsupported, to_flight_error
from flight_server.flight_sql import FlightSql
from flight_server.partitions import LocationRing, ReadPlan, plan_read
from flight_server.sql import CheckedQuery, SqlSandbox, check_query
from flight_server.table_cache import TableCache
from flight_server.writer import Writer

log = logging.getLogger("flight_share.server")
F = TypeVar("F", bound=Callable[..., Any])


def _rpc(handler: F) -> F:
    """Run a handler; map whatever it raises once, here. Flight SQL payloads go to the Flight SQL dispatch."""

    @functools.wraps(handler)
    def wrapped(self: "FlightShareServer", *args: Any, **kwargs: Any) -> Any:
        try:
            flight_sql_call = self.flight_sql.route(handler.__name__, args)
            if flight_sql_call is not None:
                return flight_sql_call()
            return handler(self, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - every error leaves through the mapping table
            raise to_flight_error(exc) from None

    return wrapped  # type: ignore[return-value]


class FlightShareServer(flight.FlightServerBase):
    """Serves the datasets of one project over Arrow Flight."""

    def __init__(self, project: ProjectConfig, location: str, profile: str | None = None, **kwargs: Any) -> None:
        """``profile`` overrides the project's ``server.anonymous_profile``; kwargs go to pyarrow (TLS)."""
        self.project = project
        self.security = Security.for_project(project, anonymous_profile=profile)
        kwargs.setdefault("auth_handler", self.security.auth_handler())
        kwargs["middleware"] = {**(kwargs.get("middleware") or {}), **self.security.middleware()}
        super().__init__(location, **kwargs)
        self.catalog = Catalog(project)
        self.sql = SqlSandbox.from_config(project.server)
        self.writer = Writer(self.catalog, project.data_dir / "puts", project.server.max_put_bytes)
        self.flight_sql = FlightSql(self)  # Any-packed Flight SQL requests on the same port (see _rpc)
        self.locations = LocationRing(project.server.locations)  # replicas for endpoints, round-robin
        self.cache = TableCache(project.server.cache_bytes)  # hot tables as Arrow in memory
        self._calls: dict[str, int] = {}
        self._calls_lock = threading.Lock()
        self._actions: dict[str, Callable[[flight.ServerCallContext, bytes], bytes]] = {
            protocol.ACTION_LIST_DATASETS: self._list_datasets,
            protocol.ACTION_HEALTH: self._health,
        }

    # --- who is calling ---------------------------------------------------------------------
    def identity_of(self, context: flight.ServerCallContext) -> Identity:
        """The authenticated caller (or the anonymous identity, where the project allows it)."""
        return self.security.identity(context)

    def profile_of(self, context: flight.ServerCallContext) -> str:
        """The profile a call runs under."""
        return self.identity_of(context).profile

    # --- descriptors and tickets ------------------------------------------------------------
    def _command(self, descriptor: flight.FlightDescriptor, op: str = "read") -> Command:
        if descriptor.descriptor_type == flight.DescriptorType.PATH:
            return protocol.command_from_path(descriptor.path, op)  # type: ignore[arg-type]
        return protocol.decode_command(descriptor.command)

    def _endpoint(self, context: flight.ServerCallContext, command: Command) -> flight.FlightEndpoint:
        """An endpoint whose ticket is signed for the caller and expires (``server.ticket_ttl``)."""
        ticket, expires = self.security.tickets.sign(protocol.encode_command(command), self.identity_of(context).user)
        expiration = pa.scalar(int(expires * 1_000_000), pa.timestamp("us", tz="UTC"))
        return flight.FlightEndpoint(flight.Ticket(ticket), [], expiration)

    def _command_from_ticket(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> Command:
        data = self.security.tickets.open(ticket.ticket, self.identity_of(context).user)
        command = protocol.decode_command(data)
        audit.annotate(context, command.dataset, getattr(command, "table", None))
        return command

    def _sql(self, profile: str, command: SqlCommand) -> tuple[Any, CheckedQuery]:
        storage = self.catalog.open(profile, command.dataset)
        columns = {t: list(storage.table_columns(t)) for t in storage.table_names()}
        return storage, check_query(command.query, command.dataset, columns)

    def _schema(self, context: flight.ServerCallContext, profile: str, command: Command) -> pa.Schema:
        if isinstance(command, ReadCommand):
            return self.catalog.table_schema(profile, command.dataset, command.table, command.columns)
        if isinstance(command, SqlCommand):
            storage, checked = self._sql(profile, command)
            return self.sql.schema(storage, checked, context.is_cancelled)
        raise InvalidRequest("a write command has no schema to read; use DoPut")

    def _flight_info(self, context: flight.ServerCallContext, profile: str, command: Command,
                     descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        schema = self._schema(context, profile, command)
        if isinstance(command, ReadCommand):
            storage = self.catalog.open(profile, command.dataset)
            cached = self.cache.table(storage, command) if command.partition is None else None
            if cached is not None:  # one stream from memory: splitting it would only add work
                plan = ReadPlan([command], [cached.num_rows], cached.num_rows, cached.nbytes)
            else:
                plan = plan_read(storage, command, self.project.server.endpoint_rows)
            return flight.FlightInfo(schema, descriptor, self._endpoints(context, plan), plan.total_records,
                                     plan.total_bytes, ordered=True)
        return flight.FlightInfo(schema, descriptor, self._endpoints(context, ReadPlan([command], [-1], -1, -1)), -1, -1)

    def _endpoints(self, context: flight.ServerCallContext, plan: ReadPlan) -> list[flight.FlightEndpoint]:
        """One endpoint per planned slice (flight_server/partitions.py), naming replicas round-robin;
        each ticket is signed for the caller and expires (``server.ticket_ttl``)."""
        locations = self.locations.assign(len(plan.commands))
        endpoints = []
        for i, command in enumerate(plan.commands):
            signed = self._endpoint(context, command)
            endpoints.append(flight.FlightEndpoint(signed.ticket, locations[i], signed.expiration_time,
                                                   app_metadata=plan.metadata(i)))
        return endpoints

    # --- RPCs -------------------------------------------------------------------------------
    @_rpc
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> Iterator[flight.FlightInfo]:
        profile = self.profile_of(context)
        wanted = criteria.decode("utf-8", "replace").strip() if criteria else ""
        if len(wanted) > protocol.MAX_NAME_CHARS or "\x00" in wanted:
            raise InvalidRequest(f"criteria must be a dataset name of at most {protocol.MAX_NAME_CHARS} characters without NUL")
        datasets = self.catalog.visible(profile)
        if wanted:
            audit.annotate(context, wanted)
            self.catalog.grant(profile, wanted)
            datasets = [wanted]
        infos = []
        for dataset in datasets:
            storage = self.catalog.storage(dataset)
            for table in storage.table_names():
                command = ReadCommand(dataset, table)
                descriptor = flight.FlightDescriptor.for_path(dataset, table)
                infos.append(self._flight_info(context, profile, command, descriptor))
        return iter(infos)

    @_rpc
    def get_flight_info(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        profile = self.profile_of(context)
        command = self._command(descriptor)
        audit.annotate(context, command.dataset, getattr(command, "table", None))
        if isinstance(command, WriteCommand):
            raise InvalidRequest("GetFlightInfo takes a read or sql command; 'write' is for DoPut")
        return self._flight_info(context, profile, command, descriptor)

    @_rpc
    def get_schema(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        profile = self.profile_of(context)
        command = self._command(descriptor)
        audit.annotate(context, command.dataset, getattr(command, "table", None))
        return flight.SchemaResult(self._schema(context, profile, command))

    @_rpc
    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        profile = self.profile_of(context)
        command = self._command_from_ticket(context, ticket)
        self._count("do_get")
        if isinstance(command, ReadCommand):
            storage = self.catalog.open(profile, command.dataset)
            cached = self.cache.table(storage, command, count=False) if command.partition is None else None
            if cached is not None:
                return flight.RecordBatchStream(cached)  # from memory, in C++ (table_cache.py)
            # the C++ reader goes to Flight as is: no Python runs per batch, so the audit line has no
            # streamed row/byte count for table reads (GetFlightInfo's total_records says how many)
            return flight.RecordBatchStream(
                storage.reader(command.table, command.columns, command.limit, command.partition))
        if isinstance(command, SqlCommand):
            storage, checked = self._sql(profile, command)
            # the sandbox already steps through batches (row limit, timeout): counting there is free
            return flight.RecordBatchStream(audit.counted(context, self.sql.run(storage, checked, context.is_cancelled)))
        raise InvalidRequest("a ticket must hold a read or sql command")

    @_rpc
    def do_put(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor,
               reader: flight.MetadataRecordBatchReader, writer: flight.FlightMetadataWriter) -> None:
        command = self._command(descriptor, "write")
        audit.annotate(context, command.dataset, getattr(command, "table", None))
        if not isinstance(command, WriteCommand):
            raise InvalidRequest("DoPut takes a write command or a [dataset, table] path")
        result = self.save(context, command, reader)
        writer.write(pa.py_buffer(protocol.PutResult(result.to_json()).to_bytes()))

    def save(self, context: flight.ServerCallContext, command: WriteCommand, reader: Any,
             must_exist: str | None = None, must_be_new: str | None = None) -> LoadInfo:
        """The one write path of both surfaces (DoPut and Flight SQL ingest): the writer's checks and
        load, the hot-table cache evicted whatever the outcome, rows and bytes on the audit line."""
        profile = self.profile_of(context)
        audit.annotate(context, command.dataset[:protocol.MAX_NAME_CHARS], command.table[:protocol.MAX_NAME_CHARS])
        try:
            result = self.writer.put(profile, command, reader, context.is_cancelled, must_exist, must_be_new)
        finally:
            self.cache.evict(command.dataset)
        record = audit.record_of(context)
        if record is not None:
            record.table = result.table_name
            record.rows, record.bytes = result.rows, result.bytes
        return result

    @_rpc
    def do_exchange(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor,
                    reader: Any, writer: Any) -> None:
        self.identity_of(context)
        raise Unsupported("DoExchange is not supported: read with DoGet, write with DoPut")

    @_rpc
    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return list(protocol.ACTIONS.items())

    @_rpc
    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterator[bytes]:
        self.identity_of(context)
        handler = self._actions.get(action.type)
        if handler is None:
            raise Unsupported(f"action '{action.type[:100]}' is not supported; actions: {', '.join(self._actions)}")
        body = action.body.to_pybytes() if action.body is not None else b""
        return iter([handler(context, body)])

    # --- actions ----------------------------------------------------------------------------
    def _list_datasets(self, context: flight.ServerCallContext, body: bytes) -> bytes:
        datasets = protocol.ListDatasetsRequest.from_bytes(body).datasets
        identity = self.identity_of(context)
        if datasets is not None:
            for d in datasets:
                self.catalog.grant(identity.profile, d)
        info = self.catalog.info(identity.profile, datasets)
        return dataclasses.replace(info, user=identity.user).to_bytes()

    def _health(self, context: flight.ServerCallContext, body: bytes) -> bytes:
        with self._calls_lock:
            calls = dict(self._calls)
        return json.dumps({"status": "ok", "project": self.project.name, "calls": calls}).encode()

    def _count(self, rpc: str) -> None:
        """Per-RPC call counters, reported by ``health`` (which replica served what)."""
        with self._calls_lock:
            self._calls[rpc] = self._calls.get(rpc, 0) + 1

    def shutdown(self) -> None:  # type: ignore[override]
        super().shutdown()
        self.sql.close()
        self.catalog.close()
