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

Renewal (:data:`RENEW_AFTER`): a call with a valid JWT that has lived past half its lifetime gets a
fresh ``authorization: Bearer <JWT>`` in its response headers. Clients that adopt a bearer from any
response (the ADBC Flight SQL driver's ``bearerAuthMiddleware.HeadersReceived``) so keep a connection
made with a user name and password alive as long as it makes a call at least every ``token_ttl / 2``;
an expired token is still refused.

Any failure (unknown user, wrong password, bad/expired/forged token) is the same UNAUTHENTICATED
message, and an unknown user costs the same scrypt work as a wrong password. The profile a token
stands for is looked up from the project file on every call, so a user removed from the file loses
access at the next restart even if their token has not expired.

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
import time
from dataclasses import dataclass
from typing import Any, Mapping

import jwt
import pyarrow.flight as flight

from client import protocol
from flight_server.domain.config import ConfigError, ProjectConfig
from flight_server.domain.credentials import (
    ScryptHash,
    dummy_hash,
    parse_password_hash,
    parse_token_hash,
    token_digest,
    verify_password,
)
from flight_server.domain.errors import Unauthenticated
from flight_server.transport.audit import MIDDLEWARE_KEY, AuditRecord, rpc_name
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

    def __init__(self, project: ProjectConfig, secret: bytes, anonymous_profile: str | None = None) -> None:
        self.project = project
        self._secret = secret
        self.token_ttl = project.server.token_ttl
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

    def _identity(self, user: str, method: str) -> Identity:
        config = self.project.users.get(user)
        if config is None:
            raise Unauthenticated(protocol.AUTH_FAILED)
        return Identity(user, config.profile, method)

    def anonymous(self) -> Identity:
        if self.anonymous_profile is None:
            raise Unauthenticated(protocol.AUTH_REQUIRED)
        return Identity(ANONYMOUS, self.anonymous_profile, "anonymous")

    def login(self, username: str, password: str) -> Identity:
        """Check a user name and password (same cost and same error whether or not the user exists).

        The password may be one of the user's API tokens (checked by digest, no scrypt work: a token
        has 256 bits of entropy)."""
        if password and self._tokens.get(token_digest(password)) == username:
            return self._identity(username, "token")
        stored = self._passwords.get(username)
        ok = verify_password(password, stored or self._dummy)
        if stored is None or not ok:
            raise Unauthenticated(protocol.AUTH_FAILED)
        return self._identity(username, "password")

    def issue(self, identity: Identity, now: float | None = None) -> str:
        """A signed bearer token (JWT) for a logged-in user."""
        issued = int(now if now is not None else time.time())
        claims = {
            "iss": ISSUER, "aud": self.project.name, "sub": identity.user, "prf": identity.profile,
            "iat": issued, "exp": issued + self.token_ttl, "jti": secrets.token_hex(8),
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str) -> Identity:
        """The identity behind a bearer token: a JWT we issued, or a static API token."""
        return self.verify_renewing(token)[0]

    def verify_renewing(self, token: str, now: float | None = None) -> tuple[Identity, str | None]:
        """The identity behind a bearer token, and a fresh JWT if it is one of ours past :data:`RENEW_AFTER`
        of its lifetime (static API tokens do not expire and are never renewed)."""
        if token.count(".") == 2:
            try:
                claims = jwt.decode(
                    token, self._secret, algorithms=[_ALGORITHM], audience=self.project.name, issuer=ISSUER,
                    options={"require": ["exp", "iat", "sub", "aud", "iss"]},
                )
            except jwt.PyJWTError:
                raise Unauthenticated(protocol.AUTH_FAILED) from None
            identity = self._identity(str(claims["sub"]), "jwt")
            issued, expires = int(claims["iat"]), int(claims["exp"])
            current = now if now is not None else time.time()
            renew = current >= issued + (expires - issued) * RENEW_AFTER
            return identity, (self.issue(identity, current) if renew else None)
        user = self._tokens.get(token_digest(token))
        if user is None:
            raise Unauthenticated(protocol.AUTH_FAILED)
        return self._identity(user, "token"), None

    def from_basic(self, value: str) -> Identity:
        try:
            raw = base64.b64decode(value.strip() + "=" * (-len(value.strip()) % 4), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise Unauthenticated(protocol.AUTH_FAILED) from None
        username, sep, password = raw.partition(":")
        if not sep:
            raise Unauthenticated(protocol.AUTH_FAILED)
        return self.login(username, password)

    def _anonymous_basic(self, credentials: str) -> bool:
        """True for Basic credentials that say "nobody": empty, or an empty user with an empty password."""
        text = credentials.strip().rstrip("=")
        return text in ("", "Og")  # "Og" is base64(":")

    def from_headers(self, headers: Mapping[str, Any], handshake: bool = False) -> tuple[Identity | None, str | None]:
        """The caller of a call from its headers, and a token to send back (after a Basic login)."""
        values = headers.get(protocol.AUTH_HEADER) or []
        if values:
            value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
            if len(value) > _MAX_HEADER_CHARS:
                raise Unauthenticated(protocol.AUTH_FAILED)
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() == "basic":
                if self._anonymous_basic(credentials):
                    return self.anonymous(), None
                identity = self.from_basic(credentials)
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


class CallMiddleware(flight.ServerMiddleware):
    """Per call: the caller's identity, a token to send back, and the audit record."""

    def __init__(self, identity: Identity | None, issued: str | None, record: AuditRecord) -> None:
        self.identity = identity
        self.issued = issued
        self.record = record

    def sending_headers(self) -> dict[str, str]:
        if self.issued:
            return {protocol.AUTH_HEADER: protocol.BEARER_PREFIX + self.issued}
        return {}

    def call_completed(self, exception: BaseException | None) -> None:
        self.record.finish(exception)
        self.record.write()


class CallMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Authenticates every call before its handler runs; refusals are audited too."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[Any]]) -> CallMiddleware:
        record = AuditRecord(rpc_name(info.method))
        handshake = info.method == flight.FlightMethod.HANDSHAKE
        try:
            identity, issued = self.authenticator.from_headers(headers, handshake)
        except BaseException as exc:  # noqa: BLE001 - whatever went wrong, the caller is not authenticated
            if not isinstance(exc, Unauthenticated):
                log.warning("authentication error (%s); refusing the call", type(exc).__name__)
                exc = Unauthenticated(protocol.AUTH_FAILED)
            error = to_flight_error(exc)
            record.finish(error)
            record.write()
            raise error from None
        if identity is not None:
            record.user, record.profile = identity.user, identity.profile
        return CallMiddleware(identity, issued, record)


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
        except Unauthenticated:
            raise flight.FlightUnauthenticatedError(protocol.AUTH_FAILED) from None
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
    def for_project(cls, project: ProjectConfig, anonymous_profile: str | None = None) -> "Security":
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
        """The caller of the current RPC (set by the middleware before the handler ran)."""
        middleware = context.get_middleware(MIDDLEWARE_KEY)
        identity = getattr(middleware, "identity", None)
        if identity is None:
            raise Unauthenticated(protocol.AUTH_REQUIRED)
        record = getattr(middleware, "record", None)
        if record is not None and not record.peer:
            record.peer = context.peer()
        return identity
