"""Bulk ingest (``CommandStatementIngest``, ADBC's ``adbc_ingest``) through ``Writer.put``: the same
permissions, dlt contracts and error texts as the plain DoPut (the dispatch drops the cache and writes the
audit line for both). ``schema`` names the dataset."""

from __future__ import annotations

import pyarrow as pa

from client.protocol import WriteCommand, WriteDisposition
from flight_server._vendor import FlightSql_pb2 as pb
from flight_server.domain.catalog import Catalog
from flight_server.domain.errors import InvalidRequest, NotFound, Unsupported
from flight_server.domain.writer import Writer
from flight_server.transport.call import Call
from flight_server.transport.decode import Request
from flight_server.transport.flight_sql.wire import Routes, no_transaction
from flight_server.transport.upload import Uploads

_INGEST = pb.CommandStatementIngest.TableDefinitionOptions


class Ingest:
    """The handler of CommandStatementIngest."""

    def __init__(self, catalog_name: str, catalog: Catalog, writer: Writer, uploads: Uploads) -> None:
        self.catalog_name = catalog_name
        self.uploads = uploads  # ended when its client stops sending (server.upload_idle_seconds)
        self.catalog = catalog
        self.writer = writer

    def routes(self) -> Routes:
        return {("do_put", "CommandStatementIngest"): self._ingest}

    def _ingest(self, call: Call, request: Request) -> None:
        """CommandStatementIngest: the ingest options checked here, the rest is the one write path
        (:meth:`Writer.put`), exactly as for a DoPut."""
        command = request.message
        profile = call.profile
        no_transaction(command)
        if command.temporary:
            raise Unsupported("temporary tables are not supported; ingest into a table of a dataset")
        if command.options:
            raise Unsupported(f"ingest options are not supported: {', '.join(sorted(command.options))}")
        options = command.table_definition_options
        if options.if_not_exist == _INGEST.TABLE_NOT_EXIST_OPTION_UNSPECIFIED or \
                options.if_exists == _INGEST.TABLE_EXISTS_OPTION_UNSPECIFIED:
            raise InvalidRequest(
                "table_definition_options must set if_not_exist (CREATE or FAIL) and if_exists (FAIL, APPEND or "
                f"REPLACE); got if_not_exist={_INGEST.TableNotExistOption.Name(options.if_not_exist)}, "
                f"if_exists={_INGEST.TableExistsOption.Name(options.if_exists)}"
            )
        if command.HasField("catalog") and command.catalog != self.catalog_name:
            raise NotFound(f"Catalog '{command.catalog}' not found; the catalog is project {self.catalog_name}")
        # not the session's current db_schema: the dataset is named in the command (the dispatch evicts
        # the cache of the dataset the command names)
        if not command.HasField("schema") or not command.schema:
            visible = self.catalog.visible(profile)
            raise InvalidRequest(
                f"name the dataset to ingest into as the db_schema (datasets: {', '.join(visible) or '(none)'})"
            )
        must_exist = "ingest in create mode to add it" if options.if_not_exist == _INGEST.TABLE_NOT_EXIST_OPTION_FAIL else None
        must_be_new = "ingest in append or replace mode" if options.if_exists == _INGEST.TABLE_EXISTS_OPTION_FAIL else None
        disposition: WriteDisposition = "replace" if options.if_exists == _INGEST.TABLE_EXISTS_OPTION_REPLACE else "append"
        # the same write path as DoPut: name and type checks, contract, load (the dispatch evicts the cache)
        result = self.writer.put(profile, WriteCommand(command.schema, command.table, disposition),
                                 self.uploads.open(call, False), call.cancelled, must_exist=must_exist,
                                 must_be_new=must_be_new, user=call.share_key)
        call.loaded(result)
        # DoPutUpdateResult goes back raw, not packed in Any
        call.writer.write(pa.py_buffer(pb.DoPutUpdateResult(record_count=result.rows).SerializeToString()))
