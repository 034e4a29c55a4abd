"""The Flight RPC surface: decode the request, ask the rooms, encode the answer.

No business logic lives here. Every handler runs inside :func:`_rpc`, the one place where domain
errors become Flight statuses (:func:`flight_server.errors.to_flight_error`).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import threading
from typing import Any, Callable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from client import protocol
from client.protocol import Command, ReadCommand, SqlCommand, WriteCommand
from flight_server.catalog import Catalog
from flight_server.config import ProjectConfig
from flight_server.errors import InvalidRequest, Unsupported, to_flight_error
from flight_server.partitions import LocationRing, ReadPlan, plan_read
from flight_server.sql import sandbox_query
from flight_server.writer import Writer

log = logging.getLogger("flight_share.server")
F = TypeVar("F", bound=Callable[..., Any])


def _rpc(handler: F) -> F:
    """Run a handler; map whatever it raises once, here."""

    @functools.wraps(handler)
    def wrapped(self: "FlightShareServer", *args: Any, **kwargs: Any) -> Any:
        try:
            return handler(self, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - every error leaves through the mapping table
            raise to_flight_error(exc) from None

    return wrapped  # type: ignore[return-value]


class FlightShareServer(flight.FlightServerBase):
    """Serves the datasets of one project over Arrow Flight."""

    def __init__(self, project: ProjectConfig, location: str, profile: str | None = None, **kwargs: Any) -> None:
        # pyarrow appends Python tracebacks to errors raised as built-ins; none may reach a client
        sys.tracebacklimit = 0
        super().__init__(location, **kwargs)
        self.project = project
        self.catalog = Catalog(project)
        self.default_profile = profile or project.server.profile
        self.writer = Writer(self.catalog, project.data_dir / "puts", project.server.max_put_bytes)
        self.locations = LocationRing(project.server.locations)  # replicas for endpoints, round-robin
        self._calls: dict[str, int] = {}
        self._calls_lock = threading.Lock()
        self._actions: dict[str, Callable[[flight.ServerCallContext, bytes], bytes]] = {
            protocol.ACTION_LIST_DATASETS: self._list_datasets,
            protocol.ACTION_HEALTH: self._health,
        }

    # --- who is calling ---------------------------------------------------------------------
    def profile_of(self, context: flight.ServerCallContext) -> str:
        """The profile a call runs under."""
        return self.default_profile

    # --- descriptors and tickets ------------------------------------------------------------
    def _command(self, descriptor: flight.FlightDescriptor, op: str = "read") -> Command:
        if descriptor.descriptor_type == flight.DescriptorType.PATH:
            return protocol.command_from_path(descriptor.path, op)  # type: ignore[arg-type]
        return protocol.decode_command(descriptor.command)

    def _ticket(self, context: flight.ServerCallContext, command: Command) -> flight.Ticket:
        return flight.Ticket(protocol.encode_command(command))

    def _command_from_ticket(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> Command:
        return protocol.decode_command(ticket.ticket)

    def _sql(self, profile: str, command: SqlCommand) -> tuple[Any, str]:
        storage = self.catalog.open(profile, command.dataset)
        return storage, sandbox_query(command.query, command.dataset, storage.table_names())

    def _schema(self, profile: str, command: Command) -> pa.Schema:
        if isinstance(command, ReadCommand):
            return self.catalog.table_schema(profile, command.dataset, command.table, command.columns)
        if isinstance(command, SqlCommand):
            storage, sql = self._sql(profile, command)
            return storage.query(f"SELECT * FROM ({sql}) AS q LIMIT 0").schema
        raise InvalidRequest("a write command has no schema to read; use DoPut")

    def _flight_info(self, context: flight.ServerCallContext, profile: str, command: Command,
                     descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        schema = self._schema(profile, command)
        if isinstance(command, ReadCommand):
            plan = plan_read(self.catalog.open(profile, command.dataset), command, self.project.server.endpoint_rows)
            return flight.FlightInfo(schema, descriptor, self._endpoints(context, plan), plan.total_records,
                                     plan.total_bytes, ordered=True)
        return flight.FlightInfo(schema, descriptor, self._endpoints(context, ReadPlan([command], [-1], -1, -1)), -1, -1)

    def _endpoints(self, context: flight.ServerCallContext, plan: ReadPlan) -> list[flight.FlightEndpoint]:
        """One endpoint per planned slice (flight_server/partitions.py), naming replicas round-robin."""
        locations = self.locations.assign(len(plan.commands))
        return [flight.FlightEndpoint(self._ticket(context, c), locations[i], app_metadata=plan.metadata(i))
                for i, c in enumerate(plan.commands)]

    # --- RPCs -------------------------------------------------------------------------------
    @_rpc
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> Iterator[flight.FlightInfo]:
        profile = self.profile_of(context)
        wanted = criteria.decode("utf-8", "replace").strip() if criteria else ""
        datasets = self.catalog.visible(profile)
        if wanted:
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
        command = self._command(descriptor)
        if isinstance(command, WriteCommand):
            raise InvalidRequest("GetFlightInfo takes a read or sql command; 'write' is for DoPut")
        return self._flight_info(context, self.profile_of(context), command, descriptor)

    @_rpc
    def get_schema(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        return flight.SchemaResult(self._schema(self.profile_of(context), self._command(descriptor)))

    @_rpc
    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        profile = self.profile_of(context)
        command = self._command_from_ticket(context, ticket)
        self._count("do_get")
        if isinstance(command, ReadCommand):
            storage = self.catalog.open(profile, command.dataset)
            reader = storage.reader(command.table, command.columns, command.limit, command.partition)
        elif isinstance(command, SqlCommand):
            storage, sql = self._sql(profile, command)
            reader = storage.query(sql)
        else:
            raise InvalidRequest("a ticket must hold a read or sql command")
        # the C++ reader goes to Flight as is: no Python runs per batch
        return flight.RecordBatchStream(reader)

    @_rpc
    def do_put(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor,
               reader: flight.MetadataRecordBatchReader, writer: flight.FlightMetadataWriter) -> None:
        command = self._command(descriptor, "write")
        if not isinstance(command, WriteCommand):
            raise InvalidRequest("DoPut takes a path [dataset, table] or a 'write' command")
        result = self.writer.put(self.profile_of(context), command, reader, context.is_cancelled)
        writer.write(pa.py_buffer(json.dumps({protocol.PUT_RESULT_LOAD_INFO: result.to_json()}).encode()))

    @_rpc
    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return list(protocol.ACTIONS.items())

    @_rpc
    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterator[bytes]:
        handler = self._actions.get(action.type)
        if handler is None:
            raise Unsupported(f"action '{action.type}' is not supported; actions: {', '.join(self._actions)}")
        body = action.body.to_pybytes() if action.body is not None else b""
        return iter([handler(context, body)])

    # --- actions ----------------------------------------------------------------------------
    def _list_datasets(self, context: flight.ServerCallContext, body: bytes) -> bytes:
        datasets = None
        if body:
            try:
                request = json.loads(body)
                datasets = request.get("datasets") if isinstance(request, dict) else None
            except ValueError:
                raise InvalidRequest("list-datasets body must be JSON like {\"datasets\": [\"name\"]}") from None
        if datasets is not None:
            for d in datasets:
                self.catalog.grant(self.profile_of(context), d)
        return self.catalog.info(self.profile_of(context), datasets).to_bytes()

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
        self.catalog.close()
