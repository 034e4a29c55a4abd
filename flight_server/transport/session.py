"""Flight sessions: the ``arrow_flight_session_id`` cookie and what a session remembers (its options).

A client that keeps cookies (ADBC: database option ``adbc.flight.sql.rpc.with_cookie_middleware=true``;
arrow-go's and Arrow C++'s cookie middleware) gets a session the first time it sets an option
(``SetSessionOptions``): the answer carries ``Set-Cookie: arrow_flight_session_id=<random id>`` and
the client sends the cookie on every call after. The server keeps, per session id, the options and
the user who set them, in one bounded map: at most :data:`MAX_SESSIONS` sessions (the least recently
used go first), each forgotten after :data:`SESSION_IDLE_SECONDS` without a call. A session id
presented by another user is no session at all. A client without cookies simply has no session:
its statements name their datasets.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any

import pyarrow.flight as flight

COOKIE = "arrow_flight_session_id"
MIDDLEWARE_KEY = "flight-share-session"
MAX_SESSIONS = 10_000
SESSION_IDLE_SECONDS = 8 * 3600
# what one session may hold: option names are few and known, values are names
MAX_OPTION_CHARS = 1_000


@dataclass
class Session:
    """One client session: whose it is and the options it set (``catalog``, ``schema``)."""

    user: str
    options: dict[str, str] = field(default_factory=dict)
    used: float = field(default_factory=time.monotonic)


class SessionStore:
    """Session id -> :class:`Session`, bounded in number (LRU) and in idle time."""

    def __init__(self, capacity: int = MAX_SESSIONS, idle_seconds: float = SESSION_IDLE_SECONDS) -> None:
        self.capacity, self.idle_seconds = capacity, idle_seconds
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str | None, user: str) -> Session | None:
        """The caller's live session with this id, or None (unknown, expired, or another user's)."""
        if not session_id:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.user != user:
                return None
            if now - session.used > self.idle_seconds:
                del self._sessions[session_id]
                return None
            session.used = now
            self._sessions.move_to_end(session_id)
            return session

    def create(self, user: str) -> tuple[str, Session]:
        """A new session for ``user`` (the least recently used one goes when the map is full)."""
        session_id = secrets.token_urlsafe(24)
        session = Session(user)
        with self._lock:
            self._sessions[session_id] = session
            while len(self._sessions) > self.capacity:
                self._sessions.popitem(last=False)
        return session_id, session

    def close(self, session_id: str | None, user: str) -> bool:
        """Forget the caller's session; False when there was none."""
        with self._lock:
            session = self._sessions.get(session_id or "")
            if session is None or session.user != user:
                return False
            del self._sessions[session_id]  # type: ignore[arg-type]
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


def session_id_of(headers: dict[str, list[Any]]) -> str | None:
    """The ``arrow_flight_session_id`` cookie among a call's headers, if any."""
    for value in headers.get("cookie", []):
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        try:
            cookie = SimpleCookie(text)
        except CookieError:
            continue
        if COOKIE in cookie:
            return cookie[COOKIE].value[:100]
    return None


class SessionMiddleware(flight.ServerMiddleware):
    """Holds the session cookie a call came with."""

    def __init__(self, session_id: str | None) -> None:
        self.session_id = session_id


class SessionMiddlewareFactory(flight.ServerMiddlewareFactory):
    def start_call(self, info: flight.CallInfo, headers: dict[str, list[Any]]) -> SessionMiddleware | None:
        session_id = session_id_of(headers)
        return SessionMiddleware(session_id) if session_id else None


def cookie_of(context: flight.ServerCallContext) -> str | None:
    """The session id the current call came with."""
    middleware = context.get_middleware(MIDDLEWARE_KEY)
    return getattr(middleware, "session_id", None)


def set_cookie(context: flight.ServerCallContext, session_id: str) -> None:
    """Tell the client its session id (sent with the answer's headers)."""
    context.add_header("set-cookie", f"{COOKIE}={session_id}")
