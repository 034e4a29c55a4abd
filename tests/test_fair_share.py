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


def test_a_user_holds_at_most_her_share_while_others_wait() -> None:
    share = FairShare(5, 2, 8, "SQL query", "server.sql_per_user", "SQL queries", lend_idle=True)
    share.acquire("ann", 0)
    share.acquire("ann", 0)
    share.acquire("ben", 0)
    share.acquire("cid", 0)  # 4 in use, 1 free: kept for a user who holds none
    granted: list[str] = []
    _waiter(share, "ben", granted)
    _waiter(share, "ann", granted)
    share.release("cid")  # 2 free: ben's, who is within his share; ann, beyond hers, waits
    _until(lambda: granted == ["ben"])
    share.release("ben")
    share.release("ben")  # 3 free and nobody within a share waits: ann's
    _until(lambda: granted == ["ben", "ann"])
    assert share.stats() == {"running": 3, "waiting": 0, "users": 1}


def test_a_lone_user_uses_the_idle_server_but_leaves_a_slot_for_a_newcomer() -> None:
    """Review of issue 22, F5: a lone user was capped at her share while workers stood idle."""
    share = FairShare(4, 2, 8, "SQL query", "server.sql_per_user", "SQL queries", lend_idle=True)
    for _ in range(3):
        share.acquire("ann", 0)  # beyond her share of 2: nobody else waits
    with pytest.raises(Unavailable, match="the last free SQL query slot is kept for a user who has none"):
        share.acquire("ann", 0)
    share.acquire("ben", 0)  # the newcomer's slot, at once
    assert share.stats() == {"running": 4, "waiting": 0, "users": 2}


def test_greedy_users_leave_a_newcomer_a_slot() -> None:
    """Review of issue 22, F5: two users at their share of 2 took all 4 workers; a third waited ~11 s."""
    share = FairShare(4, 2, 8, "SQL query", "server.sql_per_user", "SQL queries", lend_idle=True)
    granted: list[str] = []
    share.acquire("ann", 0)
    share.acquire("ann", 0)
    share.acquire("ben", 0)
    _waiter(share, "ben", granted)  # ben's second would take the last free slot: he waits
    share.acquire("cid", 0)  # cid holds none: the last free slot is his at once
    share.release("ann")
    share.release("ann")  # 2 free: ben's turn, one stays free
    _until(lambda: granted == ["ben"])
    share.acquire("dan", 0)
    assert share.stats() == {"running": 4, "waiting": 0, "users": 3}


def test_beyond_the_share_only_while_nobody_within_hers_waits() -> None:
    share = FairShare(6, 2, 8, "SQL query", "server.sql_per_user", "SQL queries", lend_idle=True)
    for _ in range(3):
        share.acquire("ann", 0)  # beyond her share: nobody waits
    share.acquire("ben", 0)
    share.acquire("ben", 0)  # 5 in use, 1 free: kept for a user who holds none
    granted: list[str] = []
    _waiter(share, "ann", granted)  # first in turn, but beyond her share
    _waiter(share, "ben", granted)
    share.release("ben")  # 2 free: ben, within his share, before ann
    _until(lambda: granted == ["ben"])
    share.acquire("cid", 0)  # the kept slot, at once
    assert share.stats() == {"running": 6, "waiting": 1, "users": 3}


def test_freed_slots_go_round_robin_by_user() -> None:
    """ann queued three, then ben one: ann's first, then ben's, then ann's others - not ann's three in a row."""
    share = FairShare(1, 1, 8, "SQL query", "server.sql_per_user", "SQL queries", lend_idle=True)
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
    share = FairShare(1, 1, 1, "SQL query", "server.sql_per_user", "SQL queries", lend_idle=True)
    share.acquire("ann", 0)
    granted: list[str] = []
    _waiter(share, "ann", granted)
    with pytest.raises(Unavailable, match="busy: you already have 1 SQL queries at once and 1 more waiting"):
        share.acquire("ann", 60)  # her queue is full: refused at once
    with pytest.raises(Unavailable, match=r"busy: the server waited 0.2 s") as refused:
        share.acquire("ben", 0.2)  # waited its bound
    assert "time limit" not in str(refused.value)


def test_a_caller_that_goes_away_leaves_the_queue() -> None:
    share = FairShare(1, 1, 4, "SQL query", "server.sql_per_user", "SQL queries", lend_idle=True)
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
    share = FairShare(2, 1, 0, "SQL query", "server.sql_per_user", "SQL queries")
    share.acquire(first, 0)
    with pytest.raises(Unavailable, match="busy"):  # the last slot is kept for a claimant who holds none
        share.acquire(key(nobody, "ipv4:10.0.0.1:60000"), 0)
    share.acquire(second, 0)  # another address is not refused for the first one's query


def test_a_share_that_does_not_lend_caps_a_lone_user() -> None:
    """Uploads hold threads and folders: one user holds at most her share even on an idle server."""
    share = FairShare(8, 2, 0, "upload", "server.uploads_per_user", "uploads")
    share.acquire("ann", 0)
    share.acquire("ann", 0)
    with pytest.raises(Unavailable, match=r"busy: you already have 2 uploads at once, the most one user may "
                                          r"\(server.uploads_per_user: 2\)"):
        share.acquire("ann", 0)
