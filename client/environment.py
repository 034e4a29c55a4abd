"""Where a client finds its server and credentials: arguments first, then the environment, then a token file.

One resolution for every way in (the ``flight-share`` command line, data packages, scripts), so they agree::

    url          argument  >  <PREFIX>_URL  >  the package's baked-in address  >  FLIGHT_SHARE_URL  >  grpc://127.0.0.1:8815
    credentials  arguments >  <PREFIX>_TOKEN | <PREFIX>_USERNAME/_PASSWORD
                           >  FLIGHT_SHARE_TOKEN | FLIGHT_SHARE_USERNAME/_PASSWORD
                           >  a token file: <PREFIX>_TOKEN_FILE, FLIGHT_SHARE_TOKEN_FILE,
                              or $XDG_CONFIG_HOME/flight-share/tokens/<package> (~/.config/...)

``<PREFIX>`` is a data package's name in upper case (``DLT_EXAMPLE_PROJECT``); plain scripts and the
command line have none. The first level that sets anything wins whole: a ``--username`` on the
command line is not mixed with a token from the environment. Nothing here is ever written to disk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from client.protocol import (
    DEFAULT_URL,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_TOKEN_FILE,
    ENV_URL,
    ENV_USERNAME,
)


@dataclass(frozen=True)
class ConnectionSettings:
    """A server address and the credentials to send there (keyword arguments of ``client.connect``)."""

    url: str
    credentials: Mapping[str, str] = field(default_factory=dict)
    source: str = "none"  # where the credentials came from, for messages: "arguments", "FLIGHT_SHARE_TOKEN", a file

    def __repr__(self) -> str:  # never show a secret
        return f"ConnectionSettings(url={self.url!r}, credentials={sorted(self.credentials)}, source={self.source!r})"


def env_prefix(package: str) -> str:
    """``dlt_example_project`` -> ``DLT_EXAMPLE_PROJECT``."""
    return "".join(c if c.isalnum() else "_" for c in package).upper()


def default_token_file(package: str, environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/flight-share/tokens/<package>`` (``~/.config`` when unset)."""
    environ = os.environ if environ is None else environ
    base = Path(environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "flight-share" / "tokens" / package


def read_token_file(path: str | Path) -> str:
    """The token in a file: its first non-empty line, stripped."""
    from client.errors import AuthenticationError

    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise AuthenticationError(f"cannot read token file {path}: {exc.strerror}") from None
    token = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not token:
        raise AuthenticationError(f"token file {path} is empty")
    return token


def resolve(
    url: str | None = None,
    *,
    token: str | None = None,
    username: str | None = None,
    password: str | None = None,
    token_file: str | Path | None = None,
    package: str | None = None,
    package_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ConnectionSettings:
    """Settings from explicit values, a package's own environment variables, the generic ones, a token file."""
    environ = os.environ if environ is None else environ
    prefix = env_prefix(package) if package else None
    url = (url or (prefix and environ.get(f"{prefix}_URL")) or package_url or environ.get(ENV_URL) or DEFAULT_URL)

    levels: list[tuple[str, dict[str, str | None]]] = [
        ("arguments", {"token": token, "username": username, "password": password}),
    ]
    if prefix:
        levels.append((f"{prefix}_* environment variables", {
            "token": environ.get(f"{prefix}_TOKEN"),
            "username": environ.get(f"{prefix}_USERNAME"),
            "password": environ.get(f"{prefix}_PASSWORD"),
        }))
    levels.append(("FLIGHT_SHARE_* environment variables", {
        "token": environ.get(ENV_TOKEN),
        "username": environ.get(ENV_USERNAME),
        "password": environ.get(ENV_PASSWORD),
    }))
    for source, values in levels:
        if not values["username"]:
            values["password"] = None  # a password means nothing without its user name
        credentials = {k: v for k, v in values.items() if v}
        if credentials:
            return ConnectionSettings(url, credentials, source)

    files = [token_file, prefix and environ.get(f"{prefix}_TOKEN_FILE"), environ.get(ENV_TOKEN_FILE)]
    explicit = next((f for f in files if f), None)
    if explicit:
        return ConnectionSettings(url, {"token": read_token_file(explicit)}, str(explicit))
    if package:
        default = default_token_file(package, environ)
        if default.is_file():
            return ConnectionSettings(url, {"token": read_token_file(default)}, str(default))
    return ConnectionSettings(url)

