"""Flight sessions: the ``arrow_flight_session_id`` cookie and what a session remembers (its options).

Every Flight SQL call that comes without a valid session cookie gets one in its answer's headers (``Set-Cookie:
arrow_flight_session_id=<random id>.<signature>``; signed with a key of this process, so only ids this
server issued count). A client that keeps cookies (ADBC: database option
``adbc.flight.sql.rpc.with_cookie_middleware=true``; arrow-go's and Arrow C++'s cookie middleware)
sends it back from its second call on - ADBC's first call is GetSqlInfo, at connect. (The plain
surface's answers carry no header of ours.) ``SetSessionOptions``
then makes the session under that id for the caller's user; one that comes without the cookie is
refused, saying why (the client keeps no cookies: an option it set would silently be forgotten).

The server keeps, per session id, the options and the user who set them, in one bounded map: at most
:data:`MAX_SESSIONS` sessions (the least recently used go first), at most :data:`MAX_SESSIONS_PER_USER` of
one user (a user's new session pushes out that user's own least recently used, never another user's:
all anonymous callers are one user), each forgotten after :data:`SESSION_IDLE_SECONDS` without a call. A session id presented by another user is no session.
"""

from __future__ import annotations

import hashlib
import hmac
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
# sessions one user (all anonymous callers are one user) keeps at once: more push out that user's oldest
MAX_SESSIONS_PER_USER = 64
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

    def __init__(self, capacity: int = MAX_SESSIONS, idle_seconds: float = SESSION_IDLE_SECONDS,
                 per_user: int = MAX_SESSIONS_PER_USER) -> None:
        self.capacity, self.idle_seconds, self.per_user = capacity, idle_seconds, per_user
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        # user -> that user's session ids, least recently used first: a user's new session beyond
        # per_user pushes out that user's own oldest, never another user's
        self._by_user: dict[str, OrderedDict[str, None]] = {}
        self._lock = threading.Lock()

    def _forget(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            ids = self._by_user.get(session.user)
            if ids is not None:
                ids.pop(session_id, None)
                if not ids:
                    del self._by_user[session.user]

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
                self._forget(session_id)
                return None
            session.used = now
            self._sessions.move_to_end(session_id)
            self._by_user[user].move_to_end(session_id)
            return session

    def get_or_create(self, session_id: str, user: str) -> Session | None:
        """The caller's session with this id, made if there is none (the least recently used one goes when
        the map is full); None when the id is another user's."""
        session = self.get(session_id, user)
        if session is not None:
            return session
        with self._lock:
            existing = self._sessions.get(session_id)
            if existing is not None and existing.user != user:
                return None
            session = self._sessions[session_id] = Session(user)
            self._sessions.move_to_end(session_id)
            ids = self._by_user.setdefault(user, OrderedDict())
            ids[session_id] = None
            while len(ids) > self.per_user:
                self._forget(next(iter(ids)))
            while len(self._sessions) > self.capacity:
                self._forget(next(iter(self._sessions)))
        return session

    def close(self, session_id: str | None, user: str) -> bool:
        """Forget the caller's session; False when there was none."""
        with self._lock:
            session = self._sessions.get(session_id or "")
            if session is None or session.user != user:
                return False
            self._forget(session_id)  # type: ignore[arg-type]
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


_KEY = secrets.token_bytes(32)  # signs the session ids this process issues


def _signature(token: str) -> str:
    return hmac.new(_KEY, token.encode(), hashlib.sha256).hexdigest()[:32]


def new_session_id() -> str:
    """A fresh session id: random, signed by this process."""
    token = secrets.token_urlsafe(18)
    return f"{token}.{_signature(token)}"


def issued_here(session_id: str) -> bool:
    """Whether this process issued ``session_id`` (a forged or foreign id is no session id)."""
    token, _, signature = session_id.partition(".")
    return bool(token) and hmac.compare_digest(signature, _signature(token))


def session_id_of(headers: dict[str, list[Any]]) -> str | None:
    """The ``arrow_flight_session_id`` cookie among a call's headers, if this server issued it."""
    for value in headers.get("cookie", []):
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        try:
            cookie = SimpleCookie(text)
        except CookieError:
            continue
        if COOKIE in cookie and issued_here(cookie[COOKIE].value[:100]):
            return cookie[COOKIE].value
    return None


class SessionMiddleware(flight.ServerMiddleware):
    """The session cookie a call came with."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id


class SessionMiddlewareFactory(flight.ServerMiddlewareFactory):
    def start_call(self, info: flight.CallInfo, headers: dict[str, list[Any]]) -> SessionMiddleware | None:
        session_id = session_id_of(headers)
        return SessionMiddleware(session_id) if session_id else None


def hand_out(context: flight.ServerCallContext) -> None:
    """Give a call that came without a session cookie one in its answer's headers."""
    if cookie_of(context) is None:
        context.add_header("set-cookie", f"{COOKIE}={new_session_id()}")


def cookie_of(context: flight.ServerCallContext) -> str | None:
    """The (valid) session id the current call came with."""
    middleware = context.get_middleware(MIDDLEWARE_KEY)
    return getattr(middleware, "session_id", None)


# clients that bind values and then execute the handle they bound to, not the one the bind answered
# (flightsql-dbapi, altertable-flightsql): the values they bound last are remembered, per user, connection
# and handle, for a short while - bounded like the sessions
MAX_BOUND = 1_000
MAX_BOUND_PER_USER = 64
BOUND_SECONDS = 300.0


class LastBound:
    """(user, peer, handle) -> the values last bound to that prepared statement handle on that connection."""

    def __init__(self, capacity: int = MAX_BOUND, per_user: int = MAX_BOUND_PER_USER,
                 seconds: float = BOUND_SECONDS) -> None:
        self.capacity, self.per_user, self.seconds = capacity, per_user, seconds
        self._values: OrderedDict[tuple[str, str, bytes], tuple[bytes, float]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, user: str, peer: str, handle: bytes, values: bytes) -> None:
        key = (user, peer, handle)
        with self._lock:
            self._values[key] = (values, time.monotonic())
            self._values.move_to_end(key)
            mine = [k for k in self._values if k[0] == user]
            for old in mine[:-self.per_user]:
                del self._values[old]
            while len(self._values) > self.capacity:
                self._values.popitem(last=False)

    def recall(self, user: str, peer: str, handle: bytes) -> bytes | None:
        with self._lock:
            found = self._values.get((user, peer, handle))
            if found is None:
                return None
            if time.monotonic() - found[1] > self.seconds:
                del self._values[(user, peer, handle)]
                return None
            return found[0]
