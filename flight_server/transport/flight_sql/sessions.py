"""Session options (Flight.proto): ``SetSessionOptions`` / ``GetSessionOptions`` / ``CloseSession`` with
options ``catalog`` (the project) and ``schema`` (a dataset, the current db_schema of unqualified tables),
keyed by Flight's ``arrow_flight_session_id`` cookie and the caller's user, in a bounded map
(:mod:`flight_server.transport.session`)."""

from __future__ import annotations

from collections.abc import Iterator

from flight_server._vendor import flight_messages as fm
from flight_server.domain.catalog import Catalog
from flight_server.domain.errors import InvalidRequest, NotFound
from flight_server.transport.call import Call
from flight_server.transport.decode import Request
from flight_server.transport.flight_sql.wire import Routes
from flight_server.transport.session import MAX_OPTION_CHARS, Session, SessionStore, cookie_of

# the session options this server knows (the names ADBC's Flight SQL driver uses for the current catalog
# and db_schema)
SESSION_OPTIONS = ("catalog", "schema")


class SessionActions:
    """The session actions, and the current db_schema they set for a caller's statements."""

    def __init__(self, catalog_name: str, catalog: Catalog, sessions: SessionStore) -> None:
        self.catalog_name = catalog_name
        self.catalog = catalog
        self.sessions = sessions

    def routes(self) -> Routes:
        return {
            ("do_action", "SetSessionOptions"): self._set_session_options,
            ("do_action", "GetSessionOptions"): self._get_session_options,
            ("do_action", "CloseSession"): self._close_session,
        }

    def _session(self, call: Call) -> Session | None:
        return self.sessions.get(cookie_of(call.context), call.identity.user)

    def current_schema(self, call: Call) -> str | None:
        """The dataset the caller's session set as its current db_schema (None: no session, or not set)."""
        session = self._session(call)
        return session.options.get("schema") if session is not None else None

    def _set_session_options(self, call: Call, request: Request) -> Iterator[bytes]:
        """SetSessionOptions: ``catalog`` (the project) and ``schema`` (a dataset the caller sees).

        A value the server cannot take fails the call, saying why (nothing is set); an unknown
        option name is reported per option, as Flight.proto has it (the others are set).
        """
        wanted: dict[str, str | None] = {}
        result = fm.SetSessionOptionsResult()
        for name, value in request.message.session_options.items():
            if name not in SESSION_OPTIONS:
                result.errors[name[:100]].value = fm.SetSessionOptionsResult.INVALID_NAME
                continue
            kind = value.WhichOneof("option_value")
            if kind is None:
                wanted[name] = None  # an empty value erases the option
            elif kind != "string_value" or len(value.string_value) > MAX_OPTION_CHARS:
                raise InvalidRequest(f"session option '{name}' takes a name (a string)")
            else:
                wanted[name] = self._checked_option(call, name, value.string_value)
        if wanted:
            session_id = cookie_of(call.context)
            if session_id is None:
                raise InvalidRequest(
                    "session options need Flight's session cookie, and this call came without one: keep cookies "
                    "(ADBC: db_kwargs {\"adbc.flight.sql.rpc.with_cookie_middleware\": \"true\"}) or write "
                    "tables as dataset.table")
            session = self.sessions.get_or_create(session_id, call.identity.user)
            if session is None:
                raise InvalidRequest("this session cookie belongs to another user's session; reconnect")
            for name, text in wanted.items():
                if text is None:
                    session.options.pop(name, None)
                else:
                    session.options[name] = text
        return iter([result.SerializeToString()])

    def _checked_option(self, call: Call, name: str, value: str) -> str:
        if name == "catalog":
            if value != self.catalog_name:
                raise NotFound(f"Catalog '{value}' not found; the catalog is project {self.catalog_name}")
            return value
        visible = self.catalog.visible(call.profile)
        if value not in visible:
            raise NotFound(f"Dataset '{value}' not found; datasets: {', '.join(visible) or '(none)'}", dataset=value)
        return value

    def _get_session_options(self, call: Call, request: Request) -> Iterator[bytes]:
        result = fm.GetSessionOptionsResult()
        result.session_options["catalog"].string_value = self.catalog_name
        schema = self.current_schema(call)
        if schema is not None:
            result.session_options["schema"].string_value = schema
        return iter([result.SerializeToString()])

    def _close_session(self, call: Call, request: Request) -> Iterator[bytes]:
        self.sessions.close(cookie_of(call.context), call.identity.user)
        return iter([fm.CloseSessionResult(status=fm.CloseSessionResult.CLOSED).SerializeToString()])
