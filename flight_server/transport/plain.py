"""flight-share's own surface: JSON commands (:mod:`client.protocol`), path descriptors, signed tickets
and the ``list-datasets`` / ``health`` actions. One method per (RPC, kind), listed in :meth:`routes`;
each asks the domain (catalog, SQL sandbox, writer, cache) and encodes the answer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from client import protocol
from client.protocol import ReadCommand, SqlCommand, WriteCommand
from flight_server.domain.catalog import Catalog
from flight_server.domain.errors import InvalidRequest
from flight_server.domain.partitions import LocationRing, ReadPlan, plan_read
from flight_server.domain.sql.check import CheckedQuery, check_query
from flight_server.domain.sql.engine import SqlEngine
from flight_server.domain.storage import Storage
from flight_server.domain.table_cache import TableCache
from flight_server.domain.writer import Writer
from flight_server.transport.call import Call
from flight_server.transport.decode import Request
from flight_server.transport.tickets import TicketSigner
from flight_server.transport.upload import Uploads

Handler = Callable[[Call, Request], Any]


class PlainSurface:
    """Handlers of flight-share's own requests, given the domain services they use."""

    def __init__(self, project_name: str, endpoint_rows: int, catalog: Catalog, sql: SqlEngine, writer: Writer,
                 cache: TableCache, tickets: TicketSigner, locations: LocationRing,
                 calls: Callable[[], dict[str, int]], uploads: Uploads | None = None) -> None:
        self.project_name = project_name
        self.endpoint_rows = endpoint_rows
        self.catalog = catalog
        self.sql = sql
        self.writer = writer
        self.cache = cache
        self.tickets = tickets
        self.locations = locations
        self.calls = calls
        self.uploads = uploads or Uploads()

    def routes(self) -> dict[tuple[str, str], Handler]:
        return {
            ("get_flight_info", "read"): self.read_info,
            ("get_flight_info", "sql"): self.sql_info,
            ("get_schema", "read"): self.read_schema,
            ("get_schema", "sql"): self.sql_schema,
            ("do_get", "read"): self.read,
            ("do_get", "sql"): self.run_sql,
            ("do_put", "write"): self.save,
            ("list_flights", ""): self.list_flights,
            ("list_actions", ""): self.list_actions,
            ("do_action", protocol.ACTION_LIST_DATASETS): self.list_datasets,
            ("do_action", protocol.ACTION_HEALTH): self.health,
        }

    def misuse(self, request: Request) -> str | None:
        """What to say when one of our commands reaches an RPC it has no meaning on (None: not ours)."""
        if request.rpc == "do_action":
            return None
        return {
            "get_flight_info": "GetFlightInfo takes a read or sql command; 'write' is for DoPut",
            "get_schema": "a write command has no schema to read; use DoPut",
            "do_put": "DoPut takes a write command or a [dataset, table] path",
            "do_get": "a ticket must hold a read or sql command",
        }.get(request.rpc)

    # --- reads ------------------------------------------------------------------------------------
    def _endpoints(self, call: Call, plan: ReadPlan) -> list[flight.FlightEndpoint]:
        """One endpoint per planned slice (flight_server/domain/partitions.py), naming replicas round-robin;
        each ticket is signed for the caller and expires (``server.ticket_ttl``)."""
        locations = self.locations.assign(len(plan.commands))
        endpoints = []
        for i, command in enumerate(plan.commands):
            ticket, expires = self.tickets.sign(protocol.encode_command(command), call.identity.user)
            expiration = pa.scalar(int(expires * 1_000_000), pa.timestamp("us", tz="UTC"))
            endpoints.append(flight.FlightEndpoint(flight.Ticket(ticket), locations[i], expiration,
                                                   app_metadata=plan.metadata(i)))
        return endpoints

    def read_info(self, call: Call, request: Request) -> flight.FlightInfo:
        command: ReadCommand = request.message
        storage = self.catalog.open(call.profile, command.dataset)  # the one grant check of this call
        schema = storage.arrow_schema(command.table, command.columns)
        cached = self.cache.table(storage, command) if command.partition is None else None
        if cached is not None:  # one stream from memory: splitting it would only add work
            plan = ReadPlan([command], [cached.num_rows], cached.num_rows, cached.nbytes)
        else:
            plan = plan_read(storage, command, self.endpoint_rows)
        return flight.FlightInfo(schema, call.descriptor, self._endpoints(call, plan), plan.total_records,
                                 plan.total_bytes, ordered=True)

    def read_schema(self, call: Call, request: Request) -> flight.SchemaResult:
        command: ReadCommand = request.message
        return flight.SchemaResult(self.catalog.open(call.profile, command.dataset).arrow_schema(command.table,
                                                                                               command.columns))

    def read(self, call: Call, request: Request) -> flight.FlightDataStream:
        command: ReadCommand = request.message
        storage = self.catalog.open(call.profile, command.dataset)
        cached = self.cache.table(storage, command, count=False) if command.partition is None else None
        if cached is not None:
            return flight.RecordBatchStream(cached)  # from memory, in C++ (table_cache.py)
        # the C++ reader goes to Flight as is: no Python runs per batch, so the audit line has no
        # streamed row/byte count for table reads (GetFlightInfo's total_records says how many)
        return flight.RecordBatchStream(storage.reader(command.table, command.columns, command.limit,
                                                       command.partition))

    # --- SQL --------------------------------------------------------------------------------------
    def _checked(self, call: Call, command: SqlCommand) -> tuple[Storage, CheckedQuery]:
        storage = self.catalog.open(call.profile, command.dataset)
        columns = {t: list(storage.table_columns(t)) for t in storage.readable_tables()}
        return storage, check_query(command.query, command.dataset, columns, user=call.share_key)

    def sql_info(self, call: Call, request: Request) -> flight.FlightInfo:
        storage, checked = self._checked(call, request.message)
        schema = self.sql.schema(storage, checked, call.cancelled, user=call.share_key)
        plan = ReadPlan([request.message], [-1], -1, -1)
        return flight.FlightInfo(schema, call.descriptor, self._endpoints(call, plan), -1, -1)

    def sql_schema(self, call: Call, request: Request) -> flight.SchemaResult:
        storage, checked = self._checked(call, request.message)
        return flight.SchemaResult(self.sql.schema(storage, checked, call.cancelled, user=call.share_key))

    def run_sql(self, call: Call, request: Request) -> flight.FlightDataStream:
        storage, checked = self._checked(call, request.message)
        # the sandbox already steps through batches (row limit, timeout): counting there is free
        return call.stream(self.sql.run(storage, checked, call.cancelled, user=call.share_key))

    # --- writes -----------------------------------------------------------------------------------
    def save(self, call: Call, request: Request) -> None:
        command: WriteCommand = request.message
        result = self.writer.put(call.profile, command, self.uploads.open(call, command.commit_marker), call.cancelled,
                                 user=call.share_key)
        call.loaded(result)
        call.writer.write(pa.py_buffer(protocol.PutResult(result.to_json()).to_bytes()))

    # --- listings and actions ---------------------------------------------------------------------
    def list_flights(self, call: Call, request: Request) -> Iterator[flight.FlightInfo]:
        """Every table the caller sees (or those of one dataset, named in the criteria), from the
        catalog alone: schema and one ticket each, no read plan (GetFlightInfo plans a read)."""
        criteria: bytes = request.message or b""
        wanted = criteria.decode("utf-8", "replace").strip()
        if len(wanted) > protocol.MAX_NAME_CHARS or "\x00" in wanted:
            raise InvalidRequest(f"criteria must be a dataset name of at most {protocol.MAX_NAME_CHARS} characters "
                                 "without NUL")
        datasets = [wanted] if wanted else self.catalog.visible(call.profile)
        infos = []
        for dataset in datasets:
            storage = self.catalog.open(call.profile, dataset)
            for table in storage.table_names():
                command = ReadCommand(dataset, table)
                plan = ReadPlan([command], [-1], -1, -1)
                infos.append(flight.FlightInfo(storage.arrow_schema(table), flight.FlightDescriptor.for_path(dataset, table),
                                               self._endpoints(call, plan), -1, -1, ordered=True))
        return iter(infos)

    def list_actions(self, call: Call, request: Request) -> list[tuple[str, str]]:
        return list(protocol.ACTIONS.items())

    def list_datasets(self, call: Call, request: Request) -> Iterator[bytes]:
        datasets = request.message.datasets  # a ListDatasetsRequest (decode.action)
        for dataset in datasets or ():
            self.catalog.grant(call.profile, dataset)
        info = self.catalog.info(call.profile, datasets)
        return iter([dataclasses.replace(info, user=call.identity.user).to_bytes()])

    def health(self, call: Call, request: Request) -> Iterator[bytes]:
        return iter([json.dumps({"status": "ok", "project": self.project_name, "calls": self.calls(),
                                 "sql": self.sql.stats(), "uploads": self.writer.stats()}).encode()])

