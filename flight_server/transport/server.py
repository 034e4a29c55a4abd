"""The Flight server: one decoder, one dispatch table, one error mapping, for both surfaces.

Every RPC goes the same way (:meth:`FlightShareServer._dispatch`): the caller's identity (settled by
the middleware in :mod:`flight_server.transport.auth` before any handler runs), the payload decoded
once (:mod:`flight_server.transport.decode`), the dataset and table noted on the audit line
(:mod:`flight_server.transport.audit`), the call counted for ``health``, the handler looked up by
``(rpc, kind)`` in one table - flight-share's own commands (:mod:`~flight_server.transport.plain`)
and Flight SQL's (:mod:`~flight_server.transport.flight_sql`) side by side - and whatever it raises
mapped once (:mod:`flight_server.transport.status`). A Flight SQL call that came without a session
cookie gets one with its answer (:mod:`flight_server.transport.session`). After a save, on either surface,
the hot-table cache of the dataset is dropped whatever the outcome. The handlers ask the domain (catalog, SQL
sandbox, writer, cache); the domain knows nothing of Flight.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.flight as flight

from flight_server.domain import faults
from flight_server.domain.catalog import Catalog, StorageOpener
from flight_server.domain.config import ProjectConfig
from flight_server.domain.errors import InvalidRequest, ServiceError, Unsupported
from flight_server.domain.partitions import LocationRing
from flight_server.domain.reachability import is_unreachable, unreachable
from flight_server.domain.save_journal import SAVES, SaveJournal
from flight_server.domain.sql.sandbox import SqlSandbox
from flight_server.domain.table_cache import TableCache
from flight_server.domain.warehouse import WarehouseRouter
from flight_server.domain.workdir import claim_work_dir
from flight_server.domain.writer import Writer
from flight_server.transport import audit, decode, memory, session
from flight_server.transport.auth import Security
from flight_server.transport.call import Call
from flight_server.transport.decode import RPC_NAMES, Request
from flight_server.transport.flight_sql import FlightSqlSurface
from flight_server.transport.plain import PlainSurface
from flight_server.transport.status import to_flight_error
from flight_server.transport.upload import Uploads

log = logging.getLogger("flight_share.server")


class FlightShareServer(flight.FlightServerBase):
    """Serves the datasets of one project over Arrow Flight and Flight SQL, on one port."""

    def __init__(self, project: ProjectConfig, location: str, open_storage: StorageOpener, profile: str | None = None,
                 **kwargs: Any) -> None:
        """``open_storage`` picks the adapter of a dataset (``flight_server.storage.open_storage``; the transport
        knows no adapter); ``profile`` overrides the project's ``server.anonymous_profile``; kwargs go to pyarrow
        (TLS)."""
        self.project = project
        self.security = Security.for_project(project, anonymous_profile=profile)
        kwargs.setdefault("auth_handler", self.security.auth_handler())
        kwargs["middleware"] = {**(kwargs.get("middleware") or {}), **self.security.middleware(),
                                session.MIDDLEWARE_KEY: session.SessionMiddlewareFactory()}
        super().__init__(location, **kwargs)
        self.catalog = Catalog(project, open_storage)
        self.cache = TableCache(project.server.cache_bytes)  # hot tables as Arrow in memory
        # SQL in the warehouse when it can (domain/warehouse.py), else the sandbox fed by the adapters or the cache
        self.sql = WarehouseRouter(SqlSandbox.from_config(project.server, self.cache.sql_reader))
        faults.install()  # test-only fault points, off unless a test's environment names one
        # each server process saves in a puts folder of its own; folders of processes that ended (a crash) go,
        # except the packages of saves the crash interrupted: recover() below finishes those from there
        puts = project.data_dir / "puts"
        pending = [Path(entry.folder) for entry in SaveJournal(puts / SAVES).unfinished()]
        self.writer = Writer(self.catalog, claim_work_dir(puts, keep=pending), project.server.max_put_bytes,
                             project.server.uploads_per_user)
        ceiling = memory.active_limit()
        if ceiling is not None:  # gathered batches stay a small share of the Arrow ceiling
            self.writer.coalesce_bytes = min(self.writer.coalesce_bytes, ceiling // 16)
        self.writer.recover()  # saves a crash interrupted are finished before anything is served
        self._calls: dict[str, int] = {}
        self._calls_lock = threading.Lock()
        uploads = Uploads(project.server.upload_idle_seconds, lambda: self.port)  # DoPuts end when idle too long
        self.plain = PlainSurface(
            project.name, project.server.endpoint_rows, self.catalog, self.sql, self.writer, self.cache,
            self.security.tickets, LocationRing(project.server.locations), self.calls, uploads)
        self.flight_sql = FlightSqlSurface(project.name, self.catalog, self.sql, self.writer, session.SessionStore(),
                                           self.security.tickets, uploads=uploads)
        self.routes: dict[tuple[str, str], Callable[[Call, Request], Any]] = {
            **self.plain.routes(), **self.flight_sql.routes()}

    # --- the one way in -------------------------------------------------------------------------
    def _dispatch(self, context: flight.ServerCallContext, decode_request: Callable[[Call], Request],
                  **objects: Any) -> Any:
        request: Request | None = None
        try:
            call = Call(context, self.security.identity(context), **objects)
            request = decode_request(call)
            if request.dataset is not None or request.table is not None:
                audit.annotate(context, request.dataset, request.table)
            self._count(request.rpc)
            if request.flight_sql:
                session.hand_out(context)  # Flight SQL answers carry a session cookie when the call had none
            handler = self.routes.get((request.rpc, request.kind))
            if handler is None:
                raise self._unsupported(request)
            return handler(call, request)
        except BaseException as exc:  # noqa: BLE001 - every error leaves through the mapping table
            if not isinstance(exc, ServiceError) and is_unreachable(exc):
                log.warning("a destination did not answer", exc_info=exc)  # the library's text: the log only
                exc = self._unreachable(request)
            raise to_flight_error(exc) from None
        finally:
            if request is not None and request.writes and request.dataset is not None:
                self.cache.evict(request.dataset)

    def _unreachable(self, request: Request | None) -> ServiceError:
        """A store that did not answer, named by the request's dataset's destination (never located)."""
        dataset = request.dataset if request is not None else None
        config = self.project.datasets.get(dataset) if dataset else None
        return unreachable(config.destination if config else "of this dataset", dataset)

    def _unsupported(self, request: Request) -> Exception:
        """The answer for a request no handler takes, naming what is taken there instead."""
        rpc = RPC_NAMES.get(request.rpc, request.rpc)
        if request.flight_sql:
            if request.rpc == "do_action":
                return self.flight_sql.unsupported_action(request.kind)
            there = sorted({kind for (r, kind) in self.flight_sql.routes() if r == request.rpc})
            return Unsupported(f"Flight SQL {request.kind} is not supported by this server on {rpc}; "
                               f"supported there: {', '.join(there) or '(none)'}")
        if request.rpc == "do_action":
            return Unsupported(f"action '{request.kind[:100]}' is not supported; actions: "
                               f"{', '.join(k for (r, k) in self.plain.routes() if r == 'do_action')}")
        misuse = self.plain.misuse(request)
        if misuse is not None:
            return InvalidRequest(misuse)
        return Unsupported(f"{rpc} is not supported: read with DoGet, write with DoPut")

    def calls(self) -> dict[str, int]:
        """Calls per RPC since the start, reported by ``health`` (which replica served what)."""
        with self._calls_lock:
            return dict(self._calls)

    def _count(self, rpc: str) -> None:
        with self._calls_lock:
            self._calls[rpc] = self._calls.get(rpc, 0) + 1

    # --- the RPCs: each only says how its payload is decoded ---------------------------------------
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> Any:
        return self._dispatch(context, lambda _call: Request("list_flights", "", criteria))

    def get_flight_info(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> Any:
        return self._dispatch(context, lambda _call: decode.descriptor("get_flight_info", descriptor),
                              descriptor=descriptor)

    def get_schema(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> Any:
        return self._dispatch(context, lambda _call: decode.descriptor("get_schema", descriptor),
                              descriptor=descriptor)

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> Any:
        return self._dispatch(
            context, lambda call: decode.ticket(ticket.ticket, lambda t: self.security.tickets.open(t, call.identity.user)))

    def do_put(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor,
               reader: flight.MetadataRecordBatchReader, writer: flight.FlightMetadataWriter) -> Any:
        return self._dispatch(context, lambda _call: decode.descriptor("do_put", descriptor),
                              descriptor=descriptor, reader=reader, writer=writer)

    def do_exchange(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor,
                    reader: Any, writer: Any) -> Any:
        return self._dispatch(context, lambda _call: Request("do_exchange", ""), descriptor=descriptor)

    def list_actions(self, context: flight.ServerCallContext) -> Any:
        return self._dispatch(context, lambda _call: Request("list_actions", ""))

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Any:
        return self._dispatch(context, lambda _call: decode.action(action))

    def shutdown(self) -> None:
        super().shutdown()
        self.sql.close()
        self.catalog.close()
