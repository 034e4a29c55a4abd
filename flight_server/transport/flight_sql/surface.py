"""The Flight SQL surface: its parts' handlers, one per (RPC, Flight SQL message), for the server's one
dispatch table (:mod:`flight_server.transport.server`)."""

from __future__ import annotations

import secrets

from flight_server.domain.catalog import Catalog
from flight_server.domain.errors import Unsupported
from flight_server.domain.partitions import LocationRing
from flight_server.domain.sql.engine import SqlEngine
from flight_server.domain.writer import Writer
from flight_server.transport.call import Call
from flight_server.transport.decode import ACTION_BODIES, RAW_ACTION_BODIES
from flight_server.transport.flight_sql.ingest import Ingest
from flight_server.transport.flight_sql.metadata import MetadataCommands
from flight_server.transport.flight_sql.sessions import SessionActions
from flight_server.transport.flight_sql.statements import Statements
from flight_server.transport.flight_sql.wire import Routes
from flight_server.transport.session import SessionStore
from flight_server.transport.tickets import TicketSigner
from flight_server.transport.upload import Uploads


class FlightSqlSurface:
    """Handlers of Flight SQL requests, given the domain services they use."""

    def __init__(self, catalog_name: str, catalog: Catalog, sql: SqlEngine, writer: Writer,
                 sessions: SessionStore | None = None, signer: TicketSigner | None = None,
                 endpoint_rows: int | None = None, locations: LocationRing | None = None,
                 uploads: Uploads | None = None) -> None:
        self.catalog_name = catalog_name
        uploads = uploads or Uploads()  # uploads end when their client stops sending (server.upload_idle_seconds)
        # a row-wise statement over a table of more rows than this is answered as one endpoint per partition
        # (server.sql_endpoint_rows; 0: never), naming the replicas (server.locations) round-robin, as plain
        # table reads do
        server = getattr(getattr(catalog, "project", None), "server", None)
        rows = endpoint_rows if endpoint_rows is not None else getattr(server, "sql_endpoint_rows", 0)
        ring = locations if locations is not None else LocationRing(getattr(server, "locations", ()) or ())
        seal = signer if signer is not None else TicketSigner(secrets.token_bytes(32), 3600)
        self.session_options = SessionActions(catalog_name, catalog, sessions if sessions is not None else SessionStore())
        self.metadata = MetadataCommands(catalog_name, catalog)
        self.statements = Statements(catalog_name, catalog, sql, self.session_options, seal, rows, ring, uploads)
        self.ingest = Ingest(catalog_name, catalog, writer, uploads)

    def routes(self) -> Routes:
        """(RPC, message name) -> handler, for the server's one dispatch table."""
        return {**self.metadata.routes(), **self.statements.routes(), **self.session_options.routes(),
                **self.ingest.routes()}

    @staticmethod
    def unsupported_action(name: str) -> Unsupported:
        return Unsupported(f"Flight SQL action {name} is not supported by this server; "
                           f"supported: {', '.join([*ACTION_BODIES, *RAW_ACTION_BODIES])}")

    def current_schema(self, call: Call) -> str | None:
        """The dataset the caller's session set as its current db_schema (None: no session, or not set)."""
        return self.session_options.current_schema(call)
