"""Signed, expiring DoGet tickets bound to the caller who asked for them.

A ticket is ``fst1.<payload>.<mac>``, both parts base64url without padding; the payload is JSON
``{"c": <command JSON>, "u": <user>, "x": <expiry, unix seconds>}`` and the MAC is HMAC-SHA256 over
the encoded payload with a key derived from the server's signing secret. Clients treat tickets as
opaque bytes. DoGet accepts a ticket only if the MAC matches, it has not expired, and the caller is
the user it was issued to; the profile grant is checked again on DoGet as well.

Flight SQL statement tickets are made the same way (:func:`~flight_server.transport.flight_sql.handles.encode_ticket`:
the statement handle is the command), so they expire and are bound to their caller alike.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time

from client.protocol import MAX_COMMAND_BYTES
from flight_server.domain.errors import Forbidden, InvalidRequest

PREFIX = b"fst1."
MAX_TICKET_BYTES = 2 * MAX_COMMAND_BYTES
_BAD = "ticket is not a valid flight-share ticket; get one from GetFlightInfo"


class TicketExpired(Forbidden):
    """A genuine ticket past its expiry (``expired``: unix seconds)."""


class TicketNotYours(Forbidden):
    """A genuine, current ticket that was issued to another caller."""


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


class TicketSigner:
    """Issues and opens tickets with one key."""

    def __init__(self, secret: bytes, ttl: int) -> None:
        # a key of its own, so a ticket MAC can never double as a token signature
        self._key = hmac.new(secret, b"flight-share ticket key v1", hashlib.sha256).digest()
        self.ttl = ttl

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def seal(self, purpose: bytes, data: bytes) -> bytes:
        """A MAC of ``data`` for one ``purpose`` (e.g. the bound values in a statement handle): only this
        server (and its replicas, which share the signing secret) can make one that :meth:`opens`."""
        return self._mac(b"seal:" + purpose + b"\0" + data)

    def opens(self, purpose: bytes, data: bytes, seal: bytes) -> bool:
        return hmac.compare_digest(seal, self.seal(purpose, data))

    def sign(self, command: bytes, user: str, now: float | None = None) -> tuple[bytes, float]:
        """A ticket for ``command`` usable by ``user``, and its expiry (unix seconds)."""
        expires = int((now if now is not None else time.time()) + self.ttl)
        body = json.dumps({"c": command.decode("utf-8"), "u": user, "x": expires}, separators=(",", ":"))
        payload = _b64(body.encode("utf-8"))
        return PREFIX + payload + b"." + _b64(self._mac(payload)), float(expires)

    def open(self, ticket: bytes, user: str, now: float | None = None, limit: int = MAX_TICKET_BYTES) -> bytes:
        """The command inside a ticket, if it is genuine (else :class:`InvalidRequest`), current (else
        :class:`TicketExpired`) and this user's (else :class:`TicketNotYours`); ``limit``: its largest size."""
        if len(ticket) > limit:
            raise InvalidRequest(f"ticket is {len(ticket)} bytes; at most {limit} allowed")
        if not ticket.startswith(PREFIX) or ticket.count(b".") != 2:
            raise InvalidRequest(_BAD)
        payload, _, mac = ticket[len(PREFIX):].partition(b".")
        try:
            given = _unb64(mac)
        except (binascii.Error, ValueError):
            raise InvalidRequest(_BAD) from None
        if not hmac.compare_digest(given, self._mac(payload)):
            raise InvalidRequest(_BAD)
        try:
            body = json.loads(_unb64(payload))
            command, owner, expires = body["c"].encode("utf-8"), body["u"], float(body["x"])
        except (binascii.Error, ValueError, KeyError, TypeError, AttributeError):
            raise InvalidRequest(_BAD) from None
        if (now if now is not None else time.time()) >= expires:
            raise TicketExpired("ticket has expired; call GetFlightInfo again for a new one", expired=expires)
        if not hmac.compare_digest(str(owner).encode("utf-8"), user.encode("utf-8")):
            raise TicketNotYours("ticket was issued to another caller; call GetFlightInfo for your own")
        return command
