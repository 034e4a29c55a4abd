"""Password checks under load and under attack: a cap on checks at once, and failed logins slowed down.

A password check (scrypt) takes tens of milliseconds and 16 MiB or more. :class:`LoginGuard` runs at most
``server.logins.concurrent`` of them at once (default: half the cores); a login that cannot start one
within :data:`WAIT_SECONDS`, or finds :data:`WAITING_PER_SLOT` callers per check already waiting, is
UNAVAILABLE "busy" at once, without any work.

Failed logins are counted per peer address (an IPv6 address by its /64) and per user name tried (whether
or not the user exists), each count halving every :data:`PEER_HALF_LIFE` / :data:`USER_HALF_LIFE`
seconds. A login whose address has ``peer_failures`` or whose name has ``user_failures`` recent failures
is UNAVAILABLE "too many failed logins ...; retry in N s", checked against nothing. The penalty is
bounded: a throttled attempt from an address counts against that address (hammering keeps it throttled,
at most about one half-life), never against the user name, so the user's throttle lasts seconds once
the guessing stops - an attacker cannot lock a real user out for long. A login that succeeds takes back
its own count. Both tables keep at most :data:`MAX_KEYS` entries (least recently used go first).

A login for a user name the project does not have checks no password: it takes no check slot and no CPU,
and waits as long as a recent real check took (:meth:`LoginGuard.check`, ``known=False``), so its answer
is as slow as a wrong password's. A spray of made-up names from a caller without credentials therefore
cannot keep the real users' checks waiting (review of issue 22, F1: one attacker's random names let 1 of 10
of alice's correct logins through); at most :data:`PRETENDING` such waits run at once, beyond them "busy".

pyarrow's Python API does not tell the Handshake who the peer is (``ServerCallContext`` reaches only the
handlers; `apache/arrow#35442` gave it to C++ middleware only): a Handshake login is throttled by user
name and capped, a Basic login on any other call by its address too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

from flight_server.domain.config import LoginLimits
from flight_server.domain.errors import Unauthenticated, Unavailable

WAIT_SECONDS = 5.0  # how long a login waits for a free check before it is told "busy"
# callers allowed to wait, per concurrent check: a waiting login holds a thread, not scrypt's memory, so a
# team's notebooks started together queue rather than fail (F4: 7 of 16 correct logins were refused)
WAITING_PER_SLOT = 32
PRETENDING = 256  # logins for unknown names waiting out a check's time at once (each holds a thread)
PEER_HALF_LIFE = 60.0  # seconds in which an address's failure count halves
USER_HALF_LIFE = 15.0  # ... and a user name's: short, so an attacker cannot keep a user locked out long
MAX_KEYS = 10_000  # addresses / user names remembered (each table)
BUSY = "the server is busy checking other logins; retry in a moment"
_sleep = time.sleep  # how a login for an unknown name waits (a name tests can watch)


def peer_key(peer: str | None) -> str | None:
    """The address part of a gRPC peer (``ipv4:1.2.3.4:5678`` -> ``1.2.3.4``; IPv6 by its /64)."""
    if not peer:
        return None
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else peer
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return peer[:200]
    if address.version == 6 and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address.ipv4_mapped or address) if address.version == 6 else str(address)


class FailureCounts:
    """key -> recent failures, halving every ``half_life`` seconds; at most ``capacity`` keys (LRU)."""

    def __init__(self, limit: int, half_life: float, capacity: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.half_life, self.capacity, self.clock = limit, half_life, capacity, clock
        self._counts: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (count, when)
        self._lock = threading.Lock()

    def _now_count(self, key: str, now: float) -> float:
        count, when = self._counts.get(key, (0.0, now))
        return count * 0.5 ** (max(0.0, now - when) / self.half_life)

    def _set(self, key: str, count: float, now: float) -> None:
        if count < 0.01:
            self._counts.pop(key, None)
            return
        self._counts[key] = (count, now)
        self._counts.move_to_end(key)
        while len(self._counts) > self.capacity:
            self._counts.popitem(last=False)

    def take(self, key: str, count_refusal: bool = False, look: bool = False) -> float | None:
        """Count one attempt; None when it may go ahead, else the seconds until one may (a refused attempt
        counts too when ``count_refusal``, up to twice the limit). ``look``: do not count an attempt that
        may go ahead (it is counted later, when it runs)."""
        with self._lock:
            now = self.clock()
            count = self._now_count(key, now)
            if count <= self.limit - 0.5:  # the limit-th failure in a burst still goes through, the next not
                if not look:
                    self._set(key, count + 1, now)
                return None
            if count_refusal:
                count = min(count + 1, 2.0 * self.limit)
            self._set(key, count, now)
            return max(1.0, math.ceil(self.half_life * math.log2(count / (self.limit - 0.5))))

    def give_back(self, key: str) -> None:
        """Take back one counted attempt (it succeeded, or never ran)."""
        with self._lock:
            now = self.clock()
            if key in self._counts:
                self._set(key, self._now_count(key, now) - 1, now)

    def __len__(self) -> int:
        with self._lock:
            return len(self._counts)


class LoginGuard:
    """Admits password checks: throttled per peer and user name, at most ``concurrent`` at once."""

    def __init__(self, limits: LoginLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = limits.concurrent or max(1, (os.cpu_count() or 2) // 2)
        self._checks = threading.BoundedSemaphore(self.slots)
        self._waiting, self._waiting_lock = 0, threading.Lock()
        self.peers = FailureCounts(limits.peer_failures, PEER_HALF_LIFE, clock=clock)
        self.users = FailureCounts(limits.user_failures, USER_HALF_LIFE, clock=clock)
        self._check_seconds: float | None = None  # a moving average of real checks' time (None: none yet)
        self._pretending = 0

    def _acquire(self) -> bool:
        with self._waiting_lock:
            if self._waiting >= WAITING_PER_SLOT * self.slots:
                return False
            self._waiting += 1
        try:
            return self._checks.acquire(timeout=WAIT_SECONDS)
        finally:
            with self._waiting_lock:
                self._waiting -= 1

    def _pretend(self) -> None:
        """Wait as long as a real check takes, holding no check slot (for a user name nobody has)."""
        with self._waiting_lock:
            if self._pretending >= PRETENDING:
                raise Unavailable(BUSY, limit="server.logins.concurrent")
            self._pretending += 1
        try:
            _sleep((self._check_seconds or 0.0) * random.uniform(0.9, 1.1))
        finally:
            with self._waiting_lock:
                self._pretending -= 1

    @contextlib.contextmanager
    def check(self, user: str, peer: str | None, known: bool = True) -> Iterator[bool]:
        """Admit one password check: raises :class:`Unavailable` when throttled or busy; an
        :class:`Unauthenticated` raised inside counts as a failure, anything else does not.

        Yields whether to run the check: False for a user name that is not ``known`` once a real check's
        time is known - the caller refuses it without work, after as long a wait (see the module's docstring).
        """
        address, name = peer_key(peer), user[:128]
        self._throttle(address, name, look=True)  # what is throttled already is refused before it queues
        counted = False
        failed = False
        try:
            if not known and self._check_seconds is not None:
                self._throttle(address, name)
                counted = True
                self._pretend()
                try:
                    yield False
                except Unauthenticated:
                    failed = True
                    raise
                return
            if not self._acquire():
                raise Unavailable(BUSY, limit="server.logins.concurrent")
            started = None
            try:
                # counted as it runs, not as it queues: correct logins waiting together are not guesses in
                # flight (41 at once tripped the user name's throttle with none failed)
                self._throttle(address, name)
                counted, started = True, time.monotonic()
                yield True
            except Unauthenticated:
                failed = True
                raise
            finally:
                if started is not None:
                    took = time.monotonic() - started
                    self._check_seconds = took if self._check_seconds is None else 0.8 * self._check_seconds + 0.2 * took
                self._checks.release()
        finally:
            if counted and not failed:
                self.users.give_back(name)
                if address is not None:
                    self.peers.give_back(address)

    def _throttle(self, address: str | None, name: str, look: bool = False) -> None:
        """Count an attempt against its address and user name (``look``: only refuse what is throttled)."""
        if address is not None:
            wait = self.peers.take(address, count_refusal=True, look=look)
            if wait is not None:
                raise Unavailable(f"too many failed logins from this address; retry in {wait:.0f} s",
                                  retry_after=wait, limit="server.logins.peer_failures")
        wait = self.users.take(name, look=look)
        if wait is not None:
            if address is not None and not look:
                self.peers.give_back(address)
            raise Unavailable(f"too many failed logins for this user name; retry in {wait:.0f} s",
                              retry_after=wait, limit="server.logins.user_failures")
