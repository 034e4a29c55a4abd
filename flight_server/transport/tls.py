"""TLS for the server: certificate files to pyarrow's arguments, and loud warnings where it is missing.

``serve --tls-cert CERT --tls-key KEY`` serves ``grpc+tls://``; ``--tls-client-ca CA`` also requires
every client to present a certificate signed by that CA (mutual TLS). Certificates are PEM files.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger("flight_share.tls")


class TlsError(ValueError):
    """A certificate or key that cannot be used."""


def read_pem(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read the {what} '{path}': {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"the {what} '{path}' is not a PEM file")
    return data


def server_kwargs(cert: str | Path | None, key: str | Path | None, client_ca: str | Path | None = None) -> dict[str, Any]:
    """pyarrow ``FlightServerBase`` keyword arguments for TLS (empty without a certificate)."""
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
        return {}
    if cert is None or key is None:
        raise TlsError("TLS needs both --tls-cert and --tls-key")
    kwargs: dict[str, Any] = {"tls_certificates": [(read_pem(cert, "TLS certificate"), read_pem(key, "TLS key"))]}
    if client_ca is not None:
        kwargs["verify_client"] = True
        kwargs["root_certificates"] = read_pem(client_ca, "client CA certificate")
    return kwargs


def is_loopback(host: str) -> bool:
    """True if ``host`` only listens on this machine."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def warn_if_exposed(host: str, tls: bool, has_users: bool, anonymous_profile: str | None) -> list[str]:
    """Log (and return) warnings about what a listener on ``host`` exposes."""
    warnings: list[str] = []
    if is_loopback(host):
        return warnings
    if not tls and has_users:
        warnings.append(
            "!" * 78 + "\n"
            f"!! PLAINTEXT on {host}: passwords and bearer tokens will cross the network unencrypted.\n"
            "!! Serve with --tls-cert/--tls-key (and clients with grpc+tls://), or listen on 127.0.0.1 only.\n"
            + "!" * 78
        )
    elif not tls:
        warnings.append(f"serving plaintext on non-loopback address {host}: data is not encrypted in transit")
    if anonymous_profile is not None:
        warnings.append(f"callers without credentials on {host} get profile '{anonymous_profile}' "
                        "(server.anonymous_profile)")
    for text in warnings:
        log.warning(text)
    return warnings
