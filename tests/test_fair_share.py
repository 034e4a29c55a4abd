"""FairShare (flight_server/domain/fair.py, issue 22) in process: per-user caps, round-robin by user, bounded
waits. The server-level behaviour is in tests/test_fairness.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from flight_server.domain.errors import Cancelled, Unavailable
from flight_server.domain.fair import FairShare


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30  # a bound against hanging, not a timing
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _waiter(share: FairShare, user: str, granted: list[str]) -> threading.Thread:
    def run() -> None:
        share.acquire(user, 60)
        granted.append(user)

    before = share.stats()["waiting"]
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    _until(lambda: share.stats()["waiting"] == before + 1)  # queued, in this order
    return thread


def test_a_user_holds_at_most_her_share_and_others_take_the_rest() -> None:
    share = FairShare(4, 2, 8, "SQL query", "server.sql_per_user", "SQL queries")
    share.acquire("ann", 0)
    share.acquire("ann", 0)
    with pytest.raises(Unavailable, match=r"busy: you already have 2 SQL queries at once.*server.sql_per_user: 2"):
        share.acquire("ann", 0)
    share.acquire("ben", 0)  # free slots are not ann's
    assert share.stats() == {"running": 3, "waiting": 0, "users": 2}


def test_freed_slots_go_round_robin_by_user() -> None:
    """ann queued three, then ben one: ann's first, then ben's, then ann's others - not ann's three in a row."""
    share = FairShare(1, 1, 8, "SQL query", "server.sql_per_user", "SQL queries")
    share.acquire("zoe", 0)
    granted: list[str] = []
    threads = [_waiter(share, "ann", granted) for _ in range(3)] + [_waiter(share, "ben", granted)]
    share.release("zoe")
    for expected in ("ann", "ben", "ann", "ann"):
        _until(lambda: len(granted) >= 1)
        assert granted.pop(0) == expected
        share.release(expected)
    for thread in threads:
        thread.join(10)
    assert share.stats() == {"running": 0, "waiting": 0, "users": 0}


def test_waiting_is_bounded_and_says_busy() -> None:
    share = FairShare(1, 1, 1, "SQL query", "server.sql_per_user", "SQL queries")
    share.acquire("ann", 0)
    granted: list[str] = []
    _waiter(share, "ann", granted)
    with pytest.raises(Unavailable, match="busy: you already have 1 SQL queries at once and 1 more waiting"):
        share.acquire("ann", 60)  # her queue is full: refused at once
    with pytest.raises(Unavailable, match=r"busy: the server waited 0.2 s") as refused:
        share.acquire("ben", 0.2)  # waited its bound
    assert "time limit" not in str(refused.value)


def test_a_caller_that_goes_away_leaves_the_queue() -> None:
    share = FairShare(1, 1, 4, "SQL query", "server.sql_per_user", "SQL queries")
    share.acquire("ann", 0)
    with pytest.raises(Cancelled):
        share.acquire("ben", 60, cancelled=lambda: True)
    assert share.stats()["waiting"] == 0
    share.release("ann")
    share.acquire("ben", 0)


class _Context:
    """What a Call asks of pyarrow's ServerCallContext for its share key: the peer."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


def test_callers_without_credentials_are_claimants_by_address() -> None:
    """All callers without credentials are one user name; as one claimant of the fair shares, one anonymous
    notebook's slow queries took every other anonymous caller's turn. Each address (an IPv6 address by its
    /64, as the login throttle counts) is a claimant of its own; a user is one claimant from anywhere."""
    from flight_server.transport.auth import ANONYMOUS, Identity
    from flight_server.transport.call import Call

    def key(identity: Identity, peer: str) -> str:
        return Call(_Context(peer), identity).share_key  # type: ignore[arg-type]

    nobody = Identity(ANONYMOUS, "access", "anonymous")
    first, second = key(nobody, "ipv4:10.0.0.1:50001"), key(nobody, "ipv4:10.0.0.2:50001")
    assert first != second
    assert key(nobody, "ipv4:10.0.0.1:60000") == first  # another connection from the same address
    assert key(nobody, "ipv6:[2001:db8::1]:443") == key(nobody, "ipv6:[2001:db8::2]:443")  # one /64
    ann = Identity("ann", "access", "token")
    assert key(ann, "ipv4:10.0.0.1:1") == key(ann, "ipv4:10.0.0.2:1") == "ann"
    share = FairShare(4, 1, 0, "SQL query", "server.sql_per_user", "SQL queries")
    share.acquire(first, 0)
    with pytest.raises(Unavailable, match="busy"):
        share.acquire(key(nobody, "ipv4:10.0.0.1:60000"), 0)
    share.acquire(second, 0)  # another address is not refused for the first one's query
