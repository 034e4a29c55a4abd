"""Password and API-token hashes: how they are made, written and checked. No I/O, no Flight.

Formats (self-describing strings, safe to commit to a project file)::

    scrypt$n=16384,r=8,p=1$<salt, base64>$<derived key, base64>   a password (hashlib.scrypt, 16-byte salt)
    sha256$<64 hex digits>                                        an API token (tokens are 256-bit random)

A password needs a slow, salted hash because people choose guessable ones; an API token is generated
here with 256 bits of entropy, so a plain SHA-256 is enough and lets the server look a token up
directly. Every comparison is constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
TOKEN_PREFIX = "fst_"

_SCRYPT = re.compile(r"^scrypt\$n=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")
_SHA256 = re.compile(r"^sha256\$([0-9a-f]{64})$")


class HashFormatError(ValueError):
    """A stored hash that is not in one of the formats above."""


@dataclass(frozen=True)
class ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def __str__(self) -> str:
        salt = base64.b64encode(self.salt).decode()
        key = base64.b64encode(self.key).decode()
        return f"scrypt$n={self.n},r={self.r},p={self.p}${salt}${key}"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # maxmem: scrypt needs 128 * n * r bytes; allow that plus slack
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=length,
                          maxmem=128 * n * r + (1 << 20))


def parse_password_hash(text: str) -> ScryptHash:
    """Parse (and bound) a stored password hash; raise HashFormatError saying what is expected."""
    m = _SCRYPT.match(text) if isinstance(text, str) else None
    if not m:
        raise HashFormatError("must be an scrypt hash like 'scrypt$n=16384,r=8,p=1$<salt>$<key>' "
                              "(make one with: flight-share users add NAME --profile P)")
    n, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if n < 2 or n & (n - 1) or not (1 << 10) <= n <= (1 << 20):
        raise HashFormatError(f"scrypt n={n} must be a power of two between 1024 and 1048576")
    if not 1 <= r <= 32 or not 1 <= p <= 16:
        raise HashFormatError(f"scrypt r={r}, p={p} out of range (r 1-32, p 1-16)")
    try:
        salt = base64.b64decode(m.group(4), validate=True)
        key = base64.b64decode(m.group(5), validate=True)
    except (binascii.Error, ValueError):
        raise HashFormatError("scrypt salt and key must be base64") from None
    if len(salt) < 8 or not 16 <= len(key) <= 64:
        raise HashFormatError("scrypt salt must be at least 8 bytes and the key 16-64 bytes")
    return ScryptHash(n, r, p, salt, key)


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A new salted scrypt hash of a password."""
    if not password:
        raise ValueError("an empty password cannot be hashed")
    salt = secrets.token_bytes(_SALT_BYTES)
    return str(ScryptHash(n, r, p, salt, _scrypt(password, salt, n, r, p, _KEY_BYTES)))


def verify_password(password: str, stored: ScryptHash) -> bool:
    """True if the password matches the stored hash (constant-time compare)."""
    candidate = _scrypt(password, stored.salt, stored.n, stored.r, stored.p, len(stored.key))
    return hmac.compare_digest(candidate, stored.key)


def parse_token_hash(text: str) -> str:
    """The hex digest of a stored token hash; raise HashFormatError if malformed."""
    m = _SHA256.match(text) if isinstance(text, str) else None
    if not m:
        raise HashFormatError("must be a token hash like 'sha256$<64 hex digits>' "
                              "(make one with: flight-share users add NAME --profile P --token)")
    return m.group(1)


def new_token() -> str:
    """A new random API token (shown once; only its hash is stored)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def hash_token(token: str) -> str:
    return f"sha256${token_digest(token)}"


def dummy_hash(like: ScryptHash | None = None) -> ScryptHash:
    """A hash of a random, forgotten password with the same cost as ``like``.

    Verified when a user does not exist, so a wrong user name costs as much time as a wrong password.
    """
    n, r, p = (like.n, like.r, like.p) if like is not None else (SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return parse_password_hash(hash_password(secrets.token_urlsafe(16), n=n, r=r, p=p))


def fingerprint(secret: bytes, user: str, stored: str) -> str:
    """What a bearer token carries of the credential it was made from: an HMAC (under the signing secret)
    of the user's name and the stored hash (``password_hash``, or the ``token_hash`` used to log in).

    Checked on every call against the project file's current entry, so a token dies when its user's
    password or API token changes or the user is removed - with no state kept by the server."""
    mac = hmac.new(secret, f"{user}\0{stored}".encode(), hashlib.sha256).digest()[:12]
    return base64.urlsafe_b64encode(mac).decode("ascii")
