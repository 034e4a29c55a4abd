"""Statements and prepared statements: read-only SELECTs (duckdb's dialect) through the same sandbox as
the plain ``sql`` command.

Every table is written ``dataset.table`` (or ``project.dataset.table``), or unqualified when the caller's
session set a current ``schema``; one statement reads one dataset (datasets may live on different
destinations, so there is no cross-dataset join). Handles carry the statement itself
(:mod:`~flight_server.transport.flight_sql.handles`): the server keeps no per-statement state, and every
DoGet runs the sandbox again under the caller's profile.

Large results in parallel: a row-wise statement over one table (:func:`~flight_server.domain.sql.row_wise_table`)
whose table has several partitions (``Storage.partitions(table, server.sql_endpoint_rows)``) is answered as one
endpoint per partition, ``ordered=False``, naming the replicas (``server.locations``) round-robin. Each
endpoint's ticket carries the statement and its partition ``{"dataset", "table", "spec"}``, signed together
like a plain DoGet ticket (:func:`~flight_server.transport.flight_sql.handles.encode_ticket`), and DoGet runs
the statement over that partition only; a partition this server did not plan for this statement, or planned
for another dataset, is refused. Each endpoint is a query of its own under the sandbox's limits. The plain
``sql`` command stays one endpoint.

Statement tickets (one endpoint or many) are the caller's and expire after ``server.ticket_ttl`` seconds
(their endpoints say when): another caller's, or an expired one, is refused (INVALID_ARGUMENT, "run the query
again"). Within the ttl a ticket reads a snapshot: a Delta partition reads the files of the table version it
was planned on, even if the owner replaced the table since; after the ttl nothing of it can be read.

Bound parameters (``?``, ``$1``): ``CreatePreparedStatement`` answers the parameter schema (``$1``...,
null-typed); ``DoPut(CommandPreparedStatementQuery)`` with a batch of values (one row per execution, at
most :data:`~flight_server.domain.sql.MAX_PARAMETER_ROWS` rows and ``MAX_PARAMETER_BYTES`` of Arrow IPC)
answers a ``DoPutPreparedStatementResult`` whose new handle carries the statement and the values;
clients execute that handle (GetFlightInfo, DoGet). duckdb binds the values in the sandbox; several rows
run the query once each and their results follow one another. Statement updates
(``CommandStatementUpdate``, ``CommandPreparedStatementUpdate``) are refused: read-only except ingest.

Cancelling a call (ADBC's ``adbc_cancel``, a client gone mid-stream) or the ``CancelFlightInfo`` action
(the caller's running DoGets of the FlightInfo's tickets) ends the query's sandbox process at once.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf.message import DecodeError

from flight_server._vendor import FlightSql_pb2 as pb
from flight_server._vendor import flight_messages as fm
from flight_server.domain.catalog import Catalog
from flight_server.domain.errors import Cancelled, InvalidRequest, NotFound, Unsupported
from flight_server.domain.partitions import LocationRing
from flight_server.domain.sql import (
    MAX_PARAMETER_BYTES,
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
from flight_server.domain.storage import Storage
from flight_server.transport.call import Call
from flight_server.transport.decode import Request, short_name, unpack_any
from flight_server.transport.flight_sql.handles import (
    MAX_PARTITION_BYTES,
    Statement,
    a_run_of,
    canonical,
    decode_handle,
    decode_ticket,
    encode_handle,
    encode_ticket,
    ipc_stream,
)
from flight_server.transport.flight_sql.sessions import SessionActions
from flight_server.transport.flight_sql.wire import Routes, an_endpoint, no_transaction, one_endpoint_info, pack
from flight_server.transport.session import LastBound
from flight_server.transport.tickets import TicketSigner
from flight_server.transport.upload import Uploads


@dataclass(frozen=True)
class _RowWise:
    """The one table a statement reads row by row (it may run as one endpoint per partition of it)."""

    table: str
    filtered: bool  # it has a WHERE: how many rows it answers is unknown before it runs


class Statements:
    """The handlers of statements, prepared statements and CancelFlightInfo."""

    def __init__(self, catalog_name: str, catalog: Catalog, sql: SqlEngine, sessions: SessionActions,
                 signer: TicketSigner, endpoint_rows: int, locations: LocationRing, uploads: Uploads) -> None:
        self.catalog_name = catalog_name
        self.uploads = uploads  # bound values arrive as an upload: ended when its client stops sending
        self.catalog = catalog
        self.sql = sql
        self.sessions = sessions  # the caller's current db_schema, for unqualified tables
        self.signer = signer
        # a row-wise statement over a table of more rows than this is answered as one endpoint per partition
        # (0: never), naming the replicas round-robin, as plain table reads do
        self.endpoint_rows = endpoint_rows
        self.locations = locations
        self._bound = LastBound()
        # (user, statement handle) -> a stop flag per DoGet of it now running (CancelFlightInfo sets them)
        self._running: dict[tuple[str, bytes], set[threading.Event]] = {}
        self._running_lock = threading.Lock()

    def routes(self) -> Routes:
        return {
            ("get_flight_info", "CommandStatementQuery"): self._statement_info,
            ("get_schema", "CommandStatementQuery"): self._statement_schema,
            ("get_flight_info", "CommandPreparedStatementQuery"): self._prepared_info,
            ("get_schema", "CommandPreparedStatementQuery"): self._prepared_schema,
            ("do_put", "CommandPreparedStatementQuery"): self._prepared_bind,
            ("do_put", "CommandStatementUpdate"): self._read_only,
            ("do_put", "CommandPreparedStatementUpdate"): self._read_only,
            ("do_put", "CommandStatementSubstraitPlan"): self._read_only,
            ("do_get", "TicketStatementQuery"): self._statement_get,
            ("do_action", "CreatePreparedStatement"): self._create_prepared,
            ("do_action", "ClosePreparedStatement"): self._close_prepared,
            ("do_action", "CancelFlightInfo"): self._cancel_flight_info,
        }

    def _encode(self, statement: Statement) -> bytes:
        return encode_handle(statement, self.signer)

    def _decode(self, handle: bytes) -> Statement:
        return decode_handle(handle, self.signer)

    def _prepare(self, call: Call, statement: Statement) -> tuple[Storage, CheckedQuery, pa.Table | None, _RowWise | None]:
        """The storage a statement reads, the statement checked and qualified by the sandbox, its
        bound values (checked against its placeholders; None when it has none), and the one table it
        reads row by row (:func:`row_wise_table`; None: it runs as one query)."""
        profile = call.profile
        query = statement.query
        # once: the datasets, the placeholders and the check all read this tree
        tree = parse_statement(query, user=call.share_key)
        datasets, unqualified = referenced_datasets(tree, user=call.share_key)
        visible = self.catalog.visible(profile)
        current = self.sessions.current_schema(call)
        if current is not None and current not in visible:
            current = None  # the dataset went away (or the profile lost it) since the option was set
        if unqualified:
            if current is None:
                raise InvalidRequest(
                    f"qualify every table with its dataset, as dataset.table (unqualified: {', '.join(unqualified)}), "
                    f"or set the current db_schema (SetSessionOptions, with cookies); "
                    f"datasets: {', '.join(visible) or '(none)'}"
                )
            datasets = datasets | {current}
        if len(datasets) > 1:
            raise InvalidRequest(f"a statement reads one dataset; this one names {', '.join(sorted(datasets))}")
        if not datasets and not visible:
            raise NotFound(f"profile {profile} sees no dataset of project {self.catalog_name}")
        count = parameter_count(tree, user=call.share_key)
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
        checked = check_query(tree, dataset, columns, catalog=self.catalog_name, user=call.share_key)
        table = row_wise_table(tree)  # the checked tree: its one table is one of the dataset's
        row_wise = _RowWise(table, tree.args.get("where") is not None) \
            if table is not None and set(checked.tables) == {table} else None
        return storage, checked, values, row_wise

    def _query_schema(self, call: Call, statement: Statement) -> pa.Schema:
        storage, checked, values, _ = self._prepare(call, statement)
        return self.sql.schema(storage, checked, call.cancelled, values, user=call.share_key)

    def _statement_info(self, call: Call, request: Request) -> flight.FlightInfo:
        command = request.message
        no_transaction(command)
        return self._statement_flight_info(call, Statement(command.query))

    def _statement_flight_info(self, call: Call, statement: Statement) -> flight.FlightInfo:
        """GetFlightInfo of a statement: one endpoint, or one per partition of the table a row-wise
        statement reads (each ticket seals the statement with its partition); endpoints name the
        replicas round-robin, and their order means nothing (``ordered=False``). Each ticket is the caller's
        and expires (``server.ticket_ttl``), as its endpoint says."""
        storage, checked, values, row_wise = self._prepare(call, statement)
        schema = self.sql.schema(storage, checked, call.cancelled, values, user=call.share_key)
        run = a_run_of(statement)
        if not self.endpoint_rows:
            row_wise = None  # splitting is off (server.sql_endpoint_rows): no partition plan either
        parts = storage.partitions(row_wise.table, self.endpoint_rows) if row_wise is not None else []
        specs = [{"dataset": checked.dataset, "table": row_wise.table, "spec": p.spec} for p in parts] \
            if row_wise is not None else []
        if row_wise is None or len(parts) <= 1 or any(len(canonical(spec)) > MAX_PARTITION_BYTES for spec in specs):
            handle, expires = encode_ticket(run, self.signer, call.identity.user)
            return one_endpoint_info(schema, call.descriptor, pack(pb.TicketStatementQuery(statement_handle=handle)),
                                     expires)
        locations = self.locations.assign(len(parts))
        endpoints = []
        for i, spec in enumerate(specs):
            handle, expires = encode_ticket(dataclasses.replace(run, partition=spec), self.signer, call.identity.user)
            endpoints.append(an_endpoint(pack(pb.TicketStatementQuery(statement_handle=handle)), locations[i], expires))
        # rows are known when nothing filters them (and bound values do not run the query several times);
        # per endpoint they are estimates on some destinations, so no endpoint says its count
        total = sum(p.records for p in parts) if not row_wise.filtered and values is None else -1
        return flight.FlightInfo(schema, call.descriptor, endpoints, total, -1, ordered=False)

    def _statement_schema(self, call: Call, request: Request) -> flight.SchemaResult:
        return flight.SchemaResult(self._query_schema(call, Statement(request.message.query)))

    def _statement_get(self, call: Call, request: Request) -> flight.FlightDataStream:
        handle = request.message.statement_handle
        statement = decode_ticket(handle, self.signer, call.identity.user)  # GetFlightInfo's, the caller's, current
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
                                  partition=partition, user=call.share_key)
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
        no_transaction(request.message)
        query = request.message.query
        count = parameter_count(query, user=call.share_key)
        if count:
            # the result's schema before any value is bound: the parameters bound as NULLs
            nulls = pa.table([pa.nulls(1)] * count, schema=parameter_schema(count))
            schema = self._query_schema(call, Statement(query, ipc_stream(nulls)))
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
                                  parameter_count(statement.query, user=call.share_key))
        bound = Statement(statement.query, ipc_stream(values))
        self._bound.remember(call.identity.user, call.context.peer(), request.message.prepared_statement_handle,
                             bound.parameters or b"")
        result = fm.DoPutPreparedStatementResult(prepared_statement_handle=self._encode(bound))
        call.writer.write(pa.py_buffer(result.SerializeToString()))

    @staticmethod
    def _read_only(call: Call, request: Request) -> None:
        raise Unsupported(f"{request.kind} is not supported: the server is read-only except bulk ingest "
                          "(CommandStatementIngest, adbc_ingest); statements are SELECT queries")
