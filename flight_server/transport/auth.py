"""Who is calling: users, logins, bearer tokens, and the Flight middleware that checks every RPC.

Ways in (checked by :class:`CallMiddlewareFactory` on every call, DoGet/DoPut streams included):

* ``authorization: Basic <base64 user:password>`` (padding optional, as the ADBC driver sends it):
  the password is checked against the user's scrypt hash and the response carries
  ``authorization: Bearer <JWT>`` — pyarrow's ``authenticate_basic_token`` and the ADBC Flight SQL
  driver read it from the Handshake response headers and send it on every later call. An API-token
  user logs in the same way with the token as the password (tools that only have user and password
  fields); the user name must be the token's own.
* ``authorization: Bearer <token>``: a JWT this server issued (HS256, ``exp``/``iat``/``aud``
  checked) or a static API token whose SHA-256 is in the project file.
* the legacy Flight handshake (``BasicAuth`` payload, then ``auth-token-bin`` on every call),
  through :class:`HandshakeAuthHandler` — pyarrow also needs that handler registered for the ADBC
  driver to accept the server.
* no credentials: the project's ``server.anonymous_profile`` if it has one, else UNAUTHENTICATED.
  Clients that always send something say "none" in their own ways, and these count as no
  credentials (never as a failed login): no header, Basic with an empty user and an empty password,
  and a Bearer with no token or the literal ``None``/``null``/``undefined`` (flightsql-dbapi sends
  ``Bearer None`` when given no token). A token that is present but invalid or expired stays
  UNAUTHENTICATED and never falls back to anonymous.

Sessions. A JWT carries the start of its session (``sst``, the login) and a fingerprint of the credential
it was made from (``cfp``, :func:`~flight_server.domain.credentials.fingerprint`), both checked on every
call against the project file the server runs with: a token dies when its user's password hash or the
API token it was made from changes or the user is removed (at the next start; replicas keep no state),
and when ``server.session_ttl`` (12 h) has passed since the login, renewals included.

Renewal (:data:`RENEW_AFTER`): a call with a JWT that has lived past half its lifetime - or past its
``exp`` (``server.token_ttl``), within the session: an idle connection - gets a fresh ``authorization:
Bearer <JWT>`` in its response headers, never reaching past the session's end. Clients that adopt a
bearer from any response (the ADBC Flight SQL driver's ``bearerAuthMiddleware.HeadersReceived``) so keep
a connection made with a user name and password alive, idle or not, for the session lifetime.

Any failure (unknown user, wrong password, bad/expired/forged/revoked token) is the same UNAUTHENTICATED
message, and an unknown user costs the same scrypt work as a wrong password. Password checks go through
:class:`~flight_server.transport.logins.LoginGuard` (a cap on checks at once, failed logins slowed down per
address and user name: UNAVAILABLE with "busy" or "retry in N s"). A Handshake and a GetSchema are
authenticated by the middleware as they start (pyarrow tells them no peer); every other call when its
handler asks who calls (:meth:`Security.identity`), where the peer's address is known. Refused logins are
audited with the user name tried, and the peer where known.

The signing secret comes from ``server.jwt_secret`` (``{env.NAME}`` only) or
``$FLIGHT_SHARE_JWT_SECRET``; without one a random secret is made per process (tokens and tickets
then die with the process, which is logged).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
import pyarrow.flight as flight

from client import protocol
from flight_server.domain.config import ConfigError, ProjectConfig
from flight_server.domain.credentials import (
    ScryptHash,
    dummy_hash,
    fingerprint,
    parse_password_hash,
    parse_token_hash,
    token_digest,
    verify_password,
)
from flight_server.domain.errors import Unauthenticated, Unavailable
from flight_server.transport.audit import MIDDLEWARE_KEY, AuditRecord, rpc_name, sanitise
from flight_server.transport.logins import LoginGuard
from flight_server.transport.status import to_flight_error
from flight_server.transport.tickets import TicketSigner

log = logging.getLogger("flight_share.auth")

ENV_JWT_SECRET = "FLIGHT_SHARE_JWT_SECRET"
MIN_SECRET_CHARS = 32
ANONYMOUS = "(anonymous)"  # not a valid user name, so it can never collide with a real user
ISSUER = "flight-share"
_ALGORITHM = "HS256"
_MAX_HEADER_CHARS = 8192
RENEW_AFTER = 0.5  # fraction of a JWT's lifetime after which a call gets a fresh one
# what clients send as a Bearer when they have no token (Python's None, JavaScript's null/undefined)
_NO_TOKEN = frozenset({"", "none", "null", "undefined"})


@dataclass(frozen=True)
class Identity:
    """The caller of one RPC."""

    user: str
    profile: str
    method: str  # password | jwt | token | anonymous
    credential: str = field(default="", compare=False, repr=False)  # fingerprint of the login's credential
    started: int | None = field(default=None, compare=False)  # the session's start (a JWT's ``sst``)

    @property
    def anonymous(self) -> bool:
        return self.method == "anonymous"


def resolve_secret(project: ProjectConfig) -> tuple[bytes, bool]:
    """The signing secret and whether it was generated for this process only."""
    configured = project.server.jwt_secret
    source = "server.jwt_secret"
    if configured is None and os.environ.get(ENV_JWT_SECRET):
        configured, source = os.environ[ENV_JWT_SECRET], ENV_JWT_SECRET
    if configured is None:
        return secrets.token_bytes(32), True
    if len(configured) < MIN_SECRET_CHARS:
        raise ConfigError(project.file, "server.jwt_secret" if source != ENV_JWT_SECRET else "",
                          f"the signing secret from {source} must be at least {MIN_SECRET_CHARS} characters")
    return configured.encode("utf-8"), False


class Authenticator:
    """Checks credentials against the project's users and issues/verifies bearer tokens."""

    def __init__(self, project: ProjectConfig, secret: bytes, anonymous_profile: str | None = None,
                 guard: LoginGuard | None = None) -> None:
        self.project = project
        self._secret = secret
        self.token_ttl = project.server.token_ttl
        self.session_ttl = project.server.session_ttl
        self.guard = guard if guard is not None else LoginGuard(project.server.logins)
        self.anonymous_profile = anonymous_profile if anonymous_profile is not None else project.server.anonymous_profile
        self._passwords: dict[str, ScryptHash] = {
            u.name: parse_password_hash(u.password_hash) for u in project.users.values() if u.password_hash
        }
        # the most expensive configured cost, so an unknown user takes as long as a known one
        costliest = max(self._passwords.values(), key=lambda h: h.n * h.r * h.p, default=None)
        self._dummy = dummy_hash(costliest)
        self._tokens: dict[str, str] = {
            parse_token_hash(h): u.name for u in project.users.values() for h in u.token_hashes
        }
        # user -> fingerprints of the credentials in the project file: a JWT must carry one of its user's
        self._credential: dict[str, str] = {}  # password user -> fingerprint; token digest -> fingerprint
        self._fingerprints: dict[str, frozenset[str]] = {}
        for u in project.users.values():
            mine = {parse_token_hash(h): fingerprint(secret, u.name, h) for h in u.token_hashes}
            self._credential.update(mine)
            if u.password_hash:
                self._credential[u.name] = fingerprint(secret, u.name, u.password_hash)
            self._fingerprints[u.name] = frozenset(mine.values()) | (
                {self._credential[u.name]} if u.password_hash else set())

    def _identity(self, user: str, method: str, credential: str = "", started: int | None = None) -> Identity:
        config = self.project.users.get(user)
        if config is None:
            raise Unauthenticated(protocol.AUTH_FAILED)
        return Identity(user, config.profile, method, credential, started)

    def anonymous(self) -> Identity:
        if self.anonymous_profile is None:
            raise Unauthenticated(protocol.AUTH_REQUIRED)
        return Identity(ANONYMOUS, self.anonymous_profile, "anonymous")

    def login(self, username: str, password: str, peer: str | None = None) -> Identity:
        """Check a user name and password (same cost and same error whether or not the user exists).

        The password may be one of the user's API tokens (checked by digest, no scrypt work: a token
        has 256 bits of entropy, and a right one is never throttled). A password check goes through
        the guard: :class:`Unavailable` when throttled (per ``peer`` address and user name) or busy."""
        if password:
            digest = token_digest(password)
            if self._tokens.get(digest) == username:
                return self._identity(username, "token", self._credential[digest])
        stored = self._passwords.get(username)
        with self.guard.check(username, peer, known=stored is not None) as check:
            ok = verify_password(password, stored or self._dummy) if check else False
            if stored is None or not ok:
                raise Unauthenticated(protocol.AUTH_FAILED)
        return self._identity(username, "password", self._credential[username])

    def issue(self, identity: Identity, now: float | None = None) -> str:
        """A signed bearer token (JWT) for a logged-in user: valid ``token_ttl`` seconds, never past the end
        of its session (``session_ttl`` after the login it descends from)."""
        issued = int(now if now is not None else time.time())
        started = identity.started if identity.started is not None else issued
        claims = {
            "iss": ISSUER, "aud": self.project.name, "sub": identity.user, "prf": identity.profile,
            "iat": issued, "exp": min(issued + self.token_ttl, started + self.session_ttl),
            "sst": started, "cfp": identity.credential, "jti": secrets.token_hex(8),
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str) -> Identity:
        """The identity behind a bearer token: a JWT we issued, or a static API token."""
        return self.verify_renewing(token)[0]

    def verify_renewing(self, token: str, now: float | None = None) -> tuple[Identity, str | None]:
        """The identity behind a bearer token, and a fresh JWT if it is one of ours past :data:`RENEW_AFTER`
        of its lifetime or past its ``exp`` - within its session, made from a credential its user still has
        (static API tokens do not expire and are never renewed)."""
        if token.count(".") == 2:
            try:
                claims = jwt.decode(
                    token, self._secret, algorithms=[_ALGORITHM], audience=self.project.name, issuer=ISSUER,
                    options={"require": ["exp", "iat", "sub", "aud", "iss", "sst", "cfp"], "verify_exp": False},
                )
                user, credential = str(claims["sub"]), str(claims["cfp"])
                issued, expires, started = int(claims["iat"]), int(claims["exp"]), int(claims["sst"])
            except (jwt.PyJWTError, TypeError, ValueError):
                raise Unauthenticated(protocol.AUTH_FAILED) from None
            current = now if now is not None else time.time()
            if not (started <= issued < expires and current < started + self.session_ttl) \
                    or credential not in self._fingerprints.get(user, ()):
                raise Unauthenticated(protocol.AUTH_FAILED)  # past the session, or the credential changed
            identity = self._identity(user, "jwt", credential, started)
            due = current >= issued + (expires - issued) * RENEW_AFTER  # an expired token is due too
            extends = min(int(current) + self.token_ttl, started + self.session_ttl) > expires
            return identity, (self.issue(identity, current) if due and extends else None)
        holder = self._tokens.get(token_digest(token))
        if holder is None:
            raise Unauthenticated(protocol.AUTH_FAILED)
        return self._identity(holder, "token"), None

    @staticmethod
    def _basic(value: str) -> tuple[str, str]:
        """User name and password of Basic credentials (UNAUTHENTICATED when they are not Basic's form)."""
        try:
            raw = base64.b64decode(value.strip() + "=" * (-len(value.strip()) % 4), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise Unauthenticated(protocol.AUTH_FAILED) from None
        username, sep, password = raw.partition(":")
        if not sep:
            raise Unauthenticated(protocol.AUTH_FAILED)
        return username, password

    def from_basic(self, value: str, peer: str | None = None) -> Identity:
        return self.login(*self._basic(value), peer=peer)

    def tried_user(self, headers: Mapping[str, Any]) -> str | None:
        """The user name a call's Basic credentials name (for the audit line of a refused login)."""
        values = headers.get(protocol.AUTH_HEADER) or []
        if not values:
            return None
        value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
        scheme, _, credentials = value[:_MAX_HEADER_CHARS].strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            return self._basic(credentials)[0]
        except Unauthenticated:
            return None

    def _anonymous_basic(self, credentials: str) -> bool:
        """True for Basic credentials that say "nobody": empty, or an empty user with an empty password."""
        text = credentials.strip().rstrip("=")
        return text in ("", "Og")  # "Og" is base64(":")

    def from_headers(self, headers: Mapping[str, Any], handshake: bool = False,
                     peer: str | None = None) -> tuple[Identity | None, str | None]:
        """The caller of a call from its headers, and a token to send back (after a Basic login or a renewal)."""
        values = headers.get(protocol.AUTH_HEADER) or []
        if values:
            value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
            if len(value) > _MAX_HEADER_CHARS:
                raise Unauthenticated(protocol.AUTH_FAILED)
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() == "basic":
                if self._anonymous_basic(credentials):
                    return self.anonymous(), None
                identity = self.from_basic(credentials, peer)
                return identity, self.issue(identity)
            if scheme.lower() == "bearer":
                if credentials.strip().lower() in _NO_TOKEN:
                    return self.anonymous(), None
                return self.verify_renewing(credentials.strip())
            raise Unauthenticated(protocol.AUTH_FAILED)
        legacy = headers.get(protocol.LEGACY_TOKEN_HEADER) or []
        if legacy and legacy[0]:
            token = legacy[0] if isinstance(legacy[0], str) else legacy[0].decode("utf-8", "replace")
            return self.verify(token), None
        return self._nobody(handshake), None

    def _nobody(self, handshake: bool) -> Identity | None:
        """A call without credentials: the anonymous profile, or refused (a Handshake may still log in
        through its payload, checked by HandshakeAuthHandler)."""
        if handshake:
            return self.anonymous() if self.anonymous_profile else None
        return self.anonymous()


# calls authenticated by the middleware as they start: the Handshake (its handler is the auth handler) and
# GetSchema (pyarrow's GetSchema callback turns a Flight error into UNKNOWN with a traceback)
_AT_START = frozenset({flight.FlightMethod.HANDSHAKE, flight.FlightMethod.GET_SCHEMA})
_handshake = threading.local()  # the audit record of the Handshake running on this thread (for its payload login)


def _refusal(exc: BaseException, record: AuditRecord, tried: str | None) -> BaseException:
    """The status for a refused call (anything unexpected is "authentication failed"), noted on its audit line."""
    if not isinstance(exc, (Unauthenticated, Unavailable)):
        log.warning("authentication error (%s); refusing the call", type(exc).__name__)
        exc = Unauthenticated(protocol.AUTH_FAILED)
    if tried is not None:
        record.login = sanitise(tried)
    return to_flight_error(exc)


class CallMiddleware(flight.ServerMiddleware):
    """Per call: the caller's identity (settled by :meth:`identity`), a token to send back, the audit record."""

    def __init__(self, authenticator: Authenticator, headers: Mapping[str, Any], record: AuditRecord,
                 identity: Identity | None = None, issued: str | None = None, settled: bool = False) -> None:
        self.authenticator, self.headers, self.record = authenticator, headers, record
        self.identity, self.issued, self.settled = identity, issued, settled
        self.refused: BaseException | None = None

    def identity_for(self, context: flight.ServerCallContext) -> Identity:
        """The caller, authenticated on first use with the peer's address known (a Basic login's bearer and
        a renewed one go back in the answer's headers); the refusal, audited, otherwise."""
        if not self.record.peer:
            self.record.peer = context.peer()
        if not self.settled:
            self.settled = True
            try:
                self.identity, issued = self.authenticator.from_headers(self.headers, peer=self.record.peer)
            except BaseException as exc:  # noqa: BLE001 - whatever went wrong, the caller is not authenticated
                self.refused = _refusal(exc, self.record, self.authenticator.tried_user(self.headers))
            else:
                if issued:
                    context.add_header(protocol.AUTH_HEADER, protocol.BEARER_PREFIX + issued)
                if self.identity is not None:
                    self.record.user, self.record.profile = self.identity.user, self.identity.profile
        if self.refused is not None:
            raise self.refused
        if self.identity is None:
            raise Unauthenticated(protocol.AUTH_REQUIRED)
        return self.identity

    def sending_headers(self) -> dict[str, str]:
        if self.issued:
            return {protocol.AUTH_HEADER: protocol.BEARER_PREFIX + self.issued}
        return {}

    def call_completed(self, exception: BaseException | None) -> None:
        if getattr(_handshake, "record", None) is self.record:
            _handshake.record = None
        self.record.finish(exception)
        self.record.write()


class CallMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Audits every call; authenticates a Handshake or GetSchema as it starts (refusals audited too), every
    other call when its handler asks (:meth:`Security.identity`: no handler runs for a caller it has not checked)."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[Any]]) -> CallMiddleware:
        record = AuditRecord(rpc_name(info.method))
        if info.method not in _AT_START:
            return CallMiddleware(self.authenticator, headers, record)
        try:  # pyarrow tells neither this nor the auth handler the peer: no per-address throttle here
            identity, issued = self.authenticator.from_headers(headers, info.method == flight.FlightMethod.HANDSHAKE)
        except BaseException as exc:  # noqa: BLE001 - whatever went wrong, the caller is not authenticated
            error = _refusal(exc, record, self.authenticator.tried_user(headers))
            record.finish(error)
            record.write()
            raise error from None
        if identity is not None:
            record.user, record.profile = identity.user, identity.profile
        _handshake.record = record
        return CallMiddleware(self.authenticator, headers, record, identity, issued, settled=True)


class HandshakeAuthHandler(flight.ServerAuthHandler):
    """The Flight Handshake: a ``BasicAuth`` payload in, a bearer token (JWT) out.

    Header-based logins are done by the middleware; then the stream has no payload and this
    handler does nothing (pyarrow requires one for the ADBC driver to authenticate at all).
    """

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def authenticate(self, outgoing: flight.ServerAuthSender, incoming: flight.ServerAuthReader) -> None:
        try:
            payload = incoming.read()
        except OSError:  # the client sent no payload (header-based login)
            return
        if not payload:
            return
        try:
            basic = flight.BasicAuth.deserialize(payload)
            username = basic.username.decode("utf-8") if isinstance(basic.username, bytes) else basic.username
            password = basic.password.decode("utf-8") if isinstance(basic.password, bytes) else basic.password
        except Exception:  # noqa: BLE001 - not a BasicAuth message
            raise flight.FlightUnauthenticatedError(protocol.AUTH_FAILED) from None
        if not username and not password:  # "nobody": the anonymous profile, if the project has one
            if self.authenticator.anonymous_profile is None:
                raise flight.FlightUnauthenticatedError(protocol.AUTH_REQUIRED)
            outgoing.write(b"")
            return
        try:
            identity = self.authenticator.login(username or "", password or "")
        except (Unauthenticated, Unavailable) as exc:
            record = getattr(_handshake, "record", None)
            if record is not None:
                record.login = sanitise(username or "")
            raise to_flight_error(exc) from None
        outgoing.write(self.authenticator.issue(identity).encode("utf-8"))

    def is_valid(self, token: bytes) -> bytes:
        if not token:
            return b""  # the middleware decides (Bearer header or anonymous)
        try:
            return self.authenticator.verify(token.decode("utf-8", "replace")).user.encode("utf-8")
        except Unauthenticated:
            raise flight.FlightUnauthenticatedError(protocol.AUTH_FAILED) from None


@dataclass
class Security:
    """Everything the service needs to know who calls and to sign what it hands out."""

    authenticator: Authenticator
    tickets: TicketSigner

    @classmethod
    def for_project(cls, project: ProjectConfig, anonymous_profile: str | None = None) -> Security:
        secret, generated = resolve_secret(project)
        if generated:
            log.warning("no signing secret configured (%s or server.jwt_secret): using a random one for this "
                        "process; bearer tokens and tickets will not survive a restart", ENV_JWT_SECRET)
        authenticator = Authenticator(project, secret, anonymous_profile)
        return cls(authenticator, TicketSigner(secret, project.server.ticket_ttl))

    def middleware(self) -> dict[str, flight.ServerMiddlewareFactory]:
        return {MIDDLEWARE_KEY: CallMiddlewareFactory(self.authenticator)}

    def auth_handler(self) -> flight.ServerAuthHandler:
        return HandshakeAuthHandler(self.authenticator)

    @staticmethod
    def identity(context: flight.ServerCallContext) -> Identity:
        """The caller of the current RPC, authenticated now if the middleware left it to the handler (every
        handler asks before anything else); raises the refusal (UNAUTHENTICATED, or UNAVAILABLE when busy
        or throttled) otherwise."""
        middleware = context.get_middleware(MIDDLEWARE_KEY)
        if not isinstance(middleware, CallMiddleware):
            raise Unauthenticated(protocol.AUTH_REQUIRED)
        return middleware.identity_for(context)
