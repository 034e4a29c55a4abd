"""Password checks under load and under attack: a fair cap on checks at once, and failed logins slowed down.

A password check (scrypt) takes tens of milliseconds and 16 MiB or more. :class:`LoginGuard` runs at most
``server.logins.concurrent`` of them at once (default: half the cores). The check slots are shared fairly
by *source* - the caller's address (an IPv6 address by its /64), or for a Handshake login, whose address
pyarrow does not give, the user name it tries (below) - round-robin between sources, so one source's flood of logins
only queues behind itself (:class:`~flight_server.domain.fair.FairShare`). A login that cannot start a
check within :data:`WAIT_SECONDS`, or finds :data:`WAITING_PER_SLOT` of its source's logins per slot
already waiting, is UNAVAILABLE "busy" without any work.

A login for a user name the project does not have takes its turn and its slot like any other, but holds
the slot only as long as recent real checks took, without scrypt's work or memory: it answers as a
wrong password does, in the same time, also under load - so neither its timing nor a "busy" tells
whether a name exists (review of issue 22, R2).

Failed logins are counted per address (``peer_failures``) and per user name *and source*
(``user_failures``), each count halving every :data:`PEER_HALF_LIFE` / :data:`USER_HALF_LIFE` seconds,
and per user name over all sources (``user_failures`` x :data:`SOURCES_PER_NAME`). A login for a name over
its limits is UNAVAILABLE "too many failed logins for this user name; retry in N s", checked against
nothing. An address over its limit refuses ("... from this address") only the names that already failed
from there: a spray from an address gets one guess per name per half-life, and everyone else behind that
address (an office, a JupyterHub, a proxy) still logs in (review of issue 22, B1). Refusals never count;
a login is counted as its check starts, not as it queues (correct logins waiting together are not guesses
in flight); a login that succeeds takes back its own count. So guessing a user's password from one address
throttles that user's logins from that address, not from elsewhere (R1: two threads of wrong passwords kept
alice out for as long as they ran). Only guessing from many addresses at once reaches a name's limit over
all sources. Each table keeps at most :data:`MAX_KEYS` entries (least recently used go first).

pyarrow's Python API does not tell the Handshake who the peer is (``ServerCallContext`` reaches only the
handlers; `apache/arrow#35442` gave it to C++ middleware only): a Handshake login's source is the user name
it tries. A spray of made-up names over the Handshake is then many sources with one login each, and a real
Handshake login (ADBC) waits its turn behind them rather than being refused for one shared queue (review of
issue 22, B2: 40 spraying threads refused every ADBC login); guessing alice's password over the Handshake
throttles alice's Handshake logins. The Python client logs in with Basic credentials on an ordinary call,
where the address is known, and is not affected by either.
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
from flight_server.domain.fair import FairShare

WAIT_SECONDS = 5.0  # how long a login waits for a free check before it is told "busy"
# callers allowed to wait, per concurrent check: a waiting login holds a thread, not scrypt's memory, so a
# team's notebooks started together queue rather than fail (F4: 7 of 16 correct logins were refused)
WAITING_PER_SLOT = 32
SOURCES_PER_NAME = 5  # a user name's limit over all sources, in multiples of user_failures
HANDSHAKE = "(handshake)"  # a Handshake login's source, with the user name it tries (pyarrow gives no address)
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

    def take(self, key: str, count_refusal: bool = False) -> float | None:
        """Count one attempt; None when it may go ahead, else the seconds until one may (a refused attempt
        counts too when ``count_refusal``, up to twice the limit)."""
        with self._lock:
            now = self.clock()
            count = self._now_count(key, now)
            if count <= self.limit - 0.5:  # the limit-th failure in a burst still goes through, the next not
                self._set(key, count + 1, now)
                return None
            if count_refusal:
                count = min(count + 1, 2.0 * self.limit)
            self._set(key, count, now)
            return max(1.0, math.ceil(self.half_life * math.log2(count / (self.limit - 0.5))))

    def wait_for(self, key: str) -> float | None:
        """None when one more attempt may go ahead, else the seconds until one may (nothing counted)."""
        with self._lock:
            count = self._now_count(key, self.clock())
            if count <= self.limit - 0.5:
                return None
            return max(1.0, math.ceil(self.half_life * math.log2(count / (self.limit - 0.5))))

    def current(self, key: str) -> float:
        """The recent failures of ``key`` (decayed)."""
        with self._lock:
            return self._now_count(key, self.clock())

    def add(self, key: str) -> None:
        """Count one attempt (up to twice the limit)."""
        with self._lock:
            now = self.clock()
            self._set(key, min(self._now_count(key, now) + 1, 2.0 * self.limit), now)

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
    """Admits password checks: fair by source, throttled per address and per user name and source."""

    def __init__(self, limits: LoginLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = limits.concurrent or max(1, (os.cpu_count() or 2) // 2)
        self._checks = FairShare(self.slots, self.slots, WAITING_PER_SLOT * self.slots, "login check",
                                 "server.logins.concurrent", "login checks")
        self.peers = FailureCounts(limits.peer_failures, PEER_HALF_LIFE, clock=clock)
        self.users = FailureCounts(limits.user_failures, USER_HALF_LIFE, clock=clock)  # "name\0source"
        self.names = FailureCounts(limits.user_failures * SOURCES_PER_NAME, USER_HALF_LIFE, clock=clock)
        self._check_seconds: float | None = None  # a moving average of real checks' time (None: none yet)

    @contextlib.contextmanager
    def check(self, user: str, peer: str | None, known: bool = True) -> Iterator[bool]:
        """Admit one password check: raises :class:`Unavailable` when throttled or busy; an
        :class:`Unauthenticated` raised inside counts as a failure, anything else does not.

        Yields whether to run the check: False for a user name that is not ``known`` once a real check's
        time is known - the caller refuses it without work, having held the slot as long as a check takes.
        """
        address, name = peer_key(peer), user[:128]
        # no address (a Handshake): the name tried is the source, so a spray of made-up names is many sources
        # of one login each - a Handshake login is queued behind them, not refused for their queue (B2)
        source = address or f"{HANDSHAKE} {name}"
        self._throttle(address, name, source, look=True)  # what is throttled already is refused before it queues
        try:
            self._checks.acquire(source, WAIT_SECONDS)
        except Unavailable:
            raise Unavailable(BUSY, limit="server.logins.concurrent") from None
        counted = failed = False
        real = known or self._check_seconds is None
        started: float | None = None
        try:
            self._throttle(address, name, source)
            counted, started = True, time.monotonic()
            if not real:
                _sleep(self._check_seconds * random.uniform(0.9, 1.1))  # type: ignore[operator]
            yield real
        except Unauthenticated:
            failed = True
            raise
        finally:
            if real and started is not None:
                took = time.monotonic() - started
                self._check_seconds = took if self._check_seconds is None else 0.8 * self._check_seconds + 0.2 * took
            self._checks.release(source)
            if counted and not failed:
                self.users.give_back(f"{name}\0{source}")
                self.names.give_back(name)
                if address is not None:
                    self.peers.give_back(address)

    def _throttle(self, address: str | None, name: str, source: str, look: bool = False) -> None:
        """Refuse what is throttled; unless ``look``, count the attempt against its address, its user name and
        source, and its user name. An address over its limit refuses only user names that already failed from
        there: the others behind a shared address (an office, a JupyterHub, a proxy) still log in, while a
        spray from it gets one guess per name per half-life (review of issue 22, B1). Refusals never count."""
        key = f"{name}\0{source}"
        if address is not None:
            wait = self.peers.wait_for(address)
            if wait is not None and self.users.current(key) >= 0.5:
                raise Unavailable(f"too many failed logins from this address; retry in {wait:.0f} s",
                                  retry_after=wait, limit="server.logins.peer_failures")
        wait = self.users.wait_for(key)
        if wait is None:
            wait = self.names.wait_for(name)
        if wait is not None:
            raise Unavailable(f"too many failed logins for this user name; retry in {wait:.0f} s",
                              retry_after=wait, limit="server.logins.user_failures")
        if not look:
            if address is not None:
                self.peers.add(address)
            self.users.add(key)
            self.names.add(name)
