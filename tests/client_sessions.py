"""Third-party Python Flight SQL clients on pyarrow.flight, each driven in a process of its own as its users drive it.

flightsql-dbapi and altertable-flightsql each register the Flight SQL protobuf messages
(``arrow.flight.protocol.sql``) in protobuf's default pool, as flight-share's vendored
``FlightSql_pb2`` does: any two of them in one process fail at import ("duplicate symbol"). So
tests/test_clients.py runs each session here, in a fresh interpreter, and reads one JSON answer::

    python -m tests.client_sessions CLIENT ACTION '{"port": 1234, "login": {...}, ...}'

A login is ``{"username": ..., "password": ...}``, ``{"token": ...}`` or ``{}`` (anonymous). An
error leaves as ``{"error": "<type>", "message": "<text>"}``, so a test can assert the text the
client's user would see.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

HOST = "127.0.0.1"


class Session:
    """What a test asks of a client; each client implements it the way its users would."""

    def catalogs(self) -> list[str]:
        raise NotImplementedError

    def schemas(self) -> list[str]:
        raise NotImplementedError

    def tables(self, schema: str) -> list[str]:
        raise NotImplementedError

    def columns(self, schema: str, table: str) -> list[str]:
        raise NotImplementedError

    def query(self, sql: str) -> pa.Table:
        raise NotImplementedError

    def ingest(self, schema: str, table: str, data: pa.Table, mode: str) -> int | None:
        raise NotImplementedError

    def query_with(self, sql: str, params: list[Any]) -> pa.Table:
        """``sql`` with ``params`` bound, through the client's parameter API."""
        raise NotImplementedError

    def set_schema(self, schema: str) -> None:
        """Make ``schema`` the current db_schema, through the client's session API."""
        raise NotImplementedError


class FlightSqlDbapi(Session):
    """flightsql-dbapi: ``flightsql.connect(FlightSQLClient(host, port, user/password or token, insecure=True))``."""

    def __init__(self, port: int, login: dict[str, str]) -> None:
        import flightsql

        self.conn = flightsql.connect(flightsql.FlightSQLClient(
            host=HOST, port=port, insecure=True, user=login.get("username"), password=login.get("password"),
            token=login.get("token")))

    def catalogs(self) -> list[str]:
        client = self.conn.client
        info = client.get_catalogs()
        return client.do_get(info.endpoints[0].ticket).read_all().column("catalog_name").to_pylist()

    def schemas(self) -> list[str]:
        return self.conn.flightsql_get_schema_names()

    def tables(self, schema: str) -> list[str]:
        return self.conn.flightsql_get_table_names(schema)

    def columns(self, schema: str, table: str) -> list[str]:
        return [c["name"] for c in self.conn.flightsql_get_columns(table, schema)]

    def query(self, sql: str) -> pa.Table:
        return self.query_with(sql, [])

    def query_with(self, sql: str, params: list[Any]) -> pa.Table:
        # with params: CreatePreparedStatement, DoPut(values), then GetFlightInfo of the *first* handle (the
        # DoPutPreparedStatementResult's handle, where this server carries the values, is not read)
        cursor = self.conn.cursor()
        cursor.execute(sql, params or None)
        names = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
        return pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)}) if rows else pa.table(
            {n: [] for n in names})

    def executemany(self, sql: str, rows: list[list[Any]]) -> None:
        self.conn.cursor().executemany(sql, rows)

    def set_schema(self, schema: str) -> None:
        # flightsql-dbapi has no session API (nor cookies): what the client offers for it, listed
        from flightsql import FlightSQLClient
        from flightsql.dbapi import Connection

        words = ("session", "cookie", "current", "set_schema", "set_catalog")
        offered = [name for cls in (FlightSQLClient, Connection) for name in dir(cls)
                   if any(word in name.lower() for word in words)]
        raise NotImplementedError(f"no session or current-schema API: {offered}")


class Altertable(Session):
    """altertable-flightsql: ``Client(username, password, host=, port=, tls=False)`` (no token option: an
    API token goes in as the password)."""

    def __init__(self, port: int, login: dict[str, str], schema: str | None = None) -> None:
        from altertable_flightsql import Client

        username = login.get("username", "bot" if "token" in login else "")
        password = login.get("password", login.get("token", ""))
        # schema=: the current schema, set (SetSessionOptions) while connecting
        self.client = Client(username, password, host=HOST, port=port, tls=False, schema=schema)

    def catalogs(self) -> list[str]:
        return self.client.get_catalogs().read_all().column("catalog_name").to_pylist()

    def schemas(self) -> list[str]:
        return self.client.get_schemas().read_all().column("db_schema_name").to_pylist()

    def tables(self, schema: str) -> list[str]:
        return self.client.get_tables(schema_pattern=schema).read_all().column("table_name").to_pylist()

    def columns(self, schema: str, table: str) -> list[str]:
        rows = self.client.get_tables(schema_pattern=schema, table_pattern=table, include_schema=True).read_all()
        return pa.ipc.read_schema(pa.py_buffer(rows.column("table_schema")[0].as_py())).names

    def query(self, sql: str) -> pa.Table:
        return self.client.query(sql).read_all()

    def query_with(self, sql: str, params: list[Any] | dict[str, Any]) -> pa.Table:
        # prepare(sql).query(parameters=...): GetFlightInfo of the unbound handle first, then DoPut(values)
        # (its answer unread), then DoGet of the first FlightInfo's ticket
        with self.client.prepare(sql) as statement:
            return statement.query(parameters=params).read_all()

    def set_schema(self, schema: str) -> None:
        self.client.set_schema(schema)  # SetSessionOptions {"schema": ...}; the client keeps no cookies

    def ingest(self, schema: str, table: str, data: pa.Table, mode: str) -> int | None:
        from altertable_flightsql.client import IngestTableMode

        with self.client.ingest(table_name=table, schema=data.schema, schema_name=schema,
                                mode=IngestTableMode[mode.upper()]) as writer:
            writer.write_table(data)
        return None


CLIENTS: dict[str, Callable[[int, dict[str, str]], Session]] = {
    "flightsql-dbapi": FlightSqlDbapi,
    "altertable-flightsql": Altertable,
}


def _jsonable(table: pa.Table) -> dict[str, Any]:
    return {"columns": table.column_names, "rows": [list(r.values()) for r in table.to_pylist()]}


def run(client: str, action: str, args: dict[str, Any]) -> Any:
    """One action of one client: ``browse``, ``query``, ``query_with`` (sql, params), ``executemany`` (sql, rows),
    ``set_schema`` (schema, sql), ``connect_with_schema`` (altertable: schema, sql), ``ingest`` or ``long_lived``."""
    session = CLIENTS[client](args["port"], args.get("login") or {})
    if action == "browse":
        schema, table = args["schema"], args["table"]
        return {"catalogs": session.catalogs(), "schemas": session.schemas(), "tables": session.tables(schema),
                "columns": session.columns(schema, table)}
    if action == "query":
        return _jsonable(session.query(args["sql"]))
    if action == "query_with":
        return _jsonable(session.query_with(args["sql"], args["params"]))
    if action == "executemany":
        return {"done": session.executemany(args["sql"], args["rows"])}
    if action == "set_schema":  # set the current schema, then run sql (unqualified names)
        session.set_schema(args["schema"])
        return _jsonable(session.query(args["sql"]))
    if action == "connect_with_schema":  # altertable: Client(..., schema=) sets it while connecting
        return _jsonable(Altertable(args["port"], args.get("login") or {}, schema=args["schema"]).query(args["sql"]))
    if action == "ingest":
        data = pa.Table.from_pydict(args["data"])
        return {"rows": session.ingest(args["schema"], args["table"], data, args["mode"])}
    if action == "long_lived":  # one connection, a query every `every` seconds until one ran after `seconds`
        counts, started, elapsed = [], time.monotonic(), 0.0
        while elapsed < args["seconds"]:
            try:
                counts.append(session.query(args["sql"]).column(0)[0].as_py())
            except Exception as exc:  # noqa: BLE001 - reported with the time it happened
                return {"counts": counts, "failed_after": round(time.monotonic() - started, 1),
                        "error": type(exc).__name__, "message": str(exc)}
            elapsed = time.monotonic() - started
            time.sleep(args["every"])
        return {"counts": counts, "last_ok_after": round(elapsed, 1)}
    raise SystemExit(f"unknown action {action}")


def main() -> None:
    client, action, raw = sys.argv[1:4]
    try:
        answer = run(client, action, json.loads(raw))
    except Exception as exc:  # noqa: BLE001 - the test asserts on the text the client's user sees
        answer = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(answer, default=str))


if __name__ == "__main__":
    main()
