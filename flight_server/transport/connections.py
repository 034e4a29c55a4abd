"""Hang up on one client connection from the server side (Linux).

A gRPC handler cannot end its own call while it waits for the client's next message: pyarrow's
``ServerCallContext`` has no ``TryCancel``, and a handler that returned while another thread still
read the call's stream would leave that thread on freed memory. What does end the wait is the
client's TCP connection going away. So :func:`hang_up` finds the server's socket of that connection
(``/proc/net/tcp{,6}``: the one from the server's port to the call's peer address, then the file
descriptor in ``/proc/self/fd`` that holds its inode) and shuts it down; gRPC then fails every call
on that connection - all of them the same client's - and closes the socket itself.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket

log = logging.getLogger("flight_share.server")

_PEER = re.compile(r"^ipv([46]):\[?([0-9A-Fa-f.:]+?)\]?:(\d+)$")


def _address(hex_address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``0100007F:1F90`` (``/proc/net/tcp``: the address as the kernel's 32-bit words, the port big-endian)."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, int(port, 16)


def _inode(local_port: int, peer_host: ipaddress.IPv4Address | ipaddress.IPv6Address, peer_port: int) -> str | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    local, remote = _address(fields[1]), _address(fields[2])
                    if local[1] == local_port and remote == (peer_host, peer_port) and fields[9] != "0":
                        return fields[9]
        except (OSError, ValueError, IndexError, StopIteration):
            continue
    return None


def hang_up(peer: str, local_port: int) -> bool:
    """Shut down the server's end of the connection from ``peer`` (a gRPC peer string such as
    ``ipv4:127.0.0.1:50312``) to ``local_port``; False when it cannot be found (already gone, not TCP)."""
    match = _PEER.match(peer or "")
    if match is None:
        return False
    host = ipaddress.ip_address(match.group(2))
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        host = host.ipv4_mapped
    inode = _inode(local_port, host, int(match.group(3)))
    if inode is None:
        return False
    target = f"socket:[{inode}]"
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != target:
                continue
            # a duplicate of gRPC's descriptor: shutting it down ends the connection, closing it closes only ours
            with socket.socket(fileno=os.dup(int(name))) as sock:
                sock.shutdown(socket.SHUT_RDWR)
            return True
        except OSError:
            continue
    return False
