"""Mask credentials as ``***`` in anything that leaves the server: log lines, errors, locations.

Two nets: patterns that look like credentials wherever they appear (URL user-info passwords,
``password=...``-style pairs, ``Bearer``/``Basic`` values, JWTs, flight-share API tokens), and the
exact secret values the project file pulled in from the environment (registered at start-up).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable

MASK = "***"
_MIN_SECRET_CHARS = 4

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host -> scheme://user:***@host
    (re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@"), r"\1***@"),
    # Authorization header values (as in headers: capitalised scheme, so prose like "bearer tokens" stays)
    (re.compile(r"\b(Bearer|Basic) +[A-Za-z0-9._~+/=-]{4,}"), r"\1 ***"),
    (re.compile(r"(?i)(\bauthorization['\"]?\s*[:=,]\s*['\"]?)[^'\"\s,}]+( +[^'\"\s,}]+)?"), r"\1***"),
    # JSON Web Tokens anywhere
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+"), MASK),
    # flight-share API tokens
    (re.compile(r"\bfst_[A-Za-z0-9_-]{8,}"), "fst_***"),
    # key=value / key: value / "key": "value" with a secret-sounding key
    (re.compile(
        r"""(?i)(\b(?:password|passwd|pwd|secret|secret_key|client_secret|token|api_key|apikey|access_key|"""
        r"""aws_secret_access_key|secret_access_key|private_key|credentials|jwt_secret)["']?\s*[:=]\s*["']?)"""
        r"""([^\s"',;&}]+)"""), r"\1***"),
)


class Masker:
    """Masks known secret values and credential-looking patterns in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        with self._lock:
            known = set(self._secrets) | {s for s in secrets if isinstance(s, str) and len(s) >= _MIN_SECRET_CHARS}
            # longest first, so a secret containing another is masked whole
            self._secrets = tuple(sorted(known, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        if not text:
            return text
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text

    def bytes(self, data: bytes) -> bytes:
        try:
            return self(data.decode("utf-8")).encode("utf-8")
        except UnicodeDecodeError:
            return data


#: the server process's masker; the project's secrets are added at start-up
mask = Masker()


class MaskingFormatter(logging.Formatter):
    """Formats like its parent, then masks the whole line (message, arguments and traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


def install(secrets: Iterable[str] = (), logger: logging.Logger | None = None) -> None:
    """Register secrets and make every handler of ``logger`` (default: root) mask what it writes."""
    mask.add(secrets)
    for handler in (logger or logging.getLogger()).handlers:
        if not isinstance(handler.formatter, MaskingFormatter):
            fmt = handler.formatter
            masking = MaskingFormatter(fmt._fmt if fmt else None, fmt.datefmt if fmt else None)
            handler.setFormatter(masking)
