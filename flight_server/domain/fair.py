"""Slots shared fairly between users: the SQL sandbox's workers, the parser, open uploads (issue 22).

A :class:`FairShare` has ``size`` slots, and it is work-conserving with a reserve: a user may take a free
slot when she holds none, and else only while one more slot stays free afterwards - the last free slot is
kept for a user who holds nothing, so any number of greedy users leave a newcomer's ``SELECT 1`` a slot.
Within that, a user holds at most ``per_user`` slots; a share built with ``lend_idle`` (the SQL workers)
lends more while no other user within her share waits (a lone user uses the idle server; review of issue
22, finding F5). Uploads and warehouse connections do not lend: what they hold is threads and folders,
or has a fallback. The price: while
every user holds a slot, one slot stays idle for the next user who comes. A slot lent to a lone user is
not taken back: if others arrive meanwhile, the first of them may take the kept slot, and the next one is
kept free again as soon as one of the lent slots is given back (at most one query's time). An operator who lets one user
hold every slot (``per_user`` = ``size``) keeps no slot in reserve. Callers that find no slot
wait in a queue of their own user, and a freed slot goes to the next *user* in turn (round-robin over
users, oldest caller first within a user), not to whoever asked most often. A wait is bounded twice: a user may have at most
``waiting_per_user`` callers queued (each one holds a server thread), and a caller waits at most the
time it is given. Either bound refuses with :class:`~flight_server.domain.errors.Unavailable` saying
"busy": a retry can succeed once others finish.

Not a library's: Python's ``threading.Semaphore`` is neither fair nor per user, and no dependency of
the project has a per-key fair queue.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from flight_server.domain.errors import Cancelled, Unavailable

# how often a waiting caller checks whether its own caller went away
_POLL_SECONDS = 0.05


class _Ticket:
    __slots__ = ("user", "granted")

    def __init__(self, user: str) -> None:
        self.user = user
        self.granted = False


class FairShare:
    """``size`` slots; at most ``per_user`` per user; waiting callers served round-robin by user.

    ``what`` names one slot's work in messages ("SQL query", ``plural`` "SQL queries"); ``setting`` the server
    key of the per-user share, so a refusal says which setting an operator would change.
    """

    def __init__(self, size: int, per_user: int, waiting_per_user: int, what: str, setting: str,
                 plural: str | None = None, lend_idle: bool = False) -> None:
        self.size = size
        self.lend_idle = lend_idle
        self.per_user = max(1, min(per_user, size))
        self.waiting_per_user = waiting_per_user
        self.what, self.setting = what, setting
        self.plural = plural or f"{what}s"
        self._lock = threading.Condition()
        self._running: dict[str, int] = {}
        self._queues: OrderedDict[str, deque[_Ticket]] = OrderedDict()  # users in turn order

    def stats(self) -> dict[str, int]:
        """Slots in use, callers waiting, users holding or waiting for a slot (for ``health``)."""
        with self._lock:
            return {"running": sum(self._running.values()), "waiting": sum(map(len, self._queues.values())),
                    "users": len(set(self._running) | set(self._queues))}

    def acquire(self, user: str, wait: float, cancelled: Callable[[], bool] | None = None,
                dataset: str | None = None) -> None:
        """Take a slot for ``user``, waiting at most ``wait`` seconds; :meth:`release` gives it back.

        ``cancelled``: the caller's cancellation, polled while it waits (a caller that left frees its place).
        """
        with self._lock:
            if not self._queues.get(user) and self._may_take(user):
                self._running[user] = self._running.get(user, 0) + 1
                return
            mine = self._running.get(user, 0)
            if wait <= 0:  # no queue: refused at once
                why = (f"you already have {mine} {self.plural} at once, the most one user may"
                       f"{' while others wait' if self.lend_idle else ''} ({self.setting}: {self.per_user})" if mine >= self.per_user and self._free() > 1 else
                       f"you already have {mine} {self.plural} at once and the last free {self.what} slot is kept "
                       f"for a user who has none" if mine and self._free() == 1 else
                       f"all {self.size} {self.what} slots of the server are in use")
                raise Unavailable(f"busy: {why}; retry when one has ended", dataset=dataset, limit=self.setting,
                                  value=self.per_user)
            queue = self._queues.setdefault(user, deque())
            if len(queue) >= self.waiting_per_user:
                if not queue:
                    del self._queues[user]
                raise Unavailable(
                    f"busy: you already have {mine} {self.plural} at once and {len(queue)} more waiting, the most "
                    f"one user may ({self.setting}: {self.per_user} at once); retry when one has ended",
                    dataset=dataset, limit=self.setting, value=self.per_user)
            ticket = _Ticket(user)
            queue.append(ticket)
            self._grant()
            deadline = time.monotonic() + max(wait, 0.0)
            while not ticket.granted:
                left = deadline - time.monotonic()
                gone = cancelled is not None and cancelled()
                if left <= 0 or gone:
                    self._withdraw(ticket)
                    if gone:
                        raise Cancelled(f"the {self.what} was cancelled by its caller while it waited", dataset=dataset)
                    running, mine = self.size - self._free(), self._running.get(user, 0)
                    rule = ("the last free one is kept for a user who holds none" if mine and self._free() == 1
                            else f"at most {self.per_user} {'while others wait' if self.lend_idle else 'at once'}, "
                                 f"{self.setting}")
                    raise Unavailable(
                        f"busy: the server waited {wait:g} s for one of its {self.size} {self.what} slots "
                        f"({running} in use; you hold {mine}; {rule}); retry",
                        dataset=dataset, limit=self.setting, value=self.per_user)
                self._lock.wait(min(left, _POLL_SECONDS) if cancelled is not None else left)

    def release(self, user: str) -> None:
        """Give back a slot :meth:`acquire` took for ``user``; the next user in turn gets it."""
        with self._lock:
            left = self._running.get(user, 0) - 1
            if left > 0:
                self._running[user] = left
            else:
                self._running.pop(user, None)
            self._grant()

    def _free(self) -> int:
        return self.size - sum(self._running.values())

    def _may_take(self, user: str) -> bool:
        """Whether ``user`` may take a free slot now (the rule in the module docstring)."""
        free, held = self._free(), self._running.get(user, 0)
        if free <= 0:
            return False
        if held == 0:
            return True
        if free < 2 and self.per_user < self.size:  # the last free slot is kept for a user who holds none
            return False
        # beyond the share only while no other user waits who is within hers
        return held < self.per_user or self.lend_idle and all(self._running.get(waiting, 0) >= self.per_user
                                                              for waiting in self._queues if waiting != user)

    def _grant(self) -> None:
        """Hand free slots to waiting callers: each time the first user in turn that may take one."""
        granted = False
        while self._free() > 0:
            user = next((u for u in self._queues if self._may_take(u)), None)
            if user is None:
                break
            queue = self._queues[user]
            ticket = queue.popleft()
            ticket.granted = True
            granted = True
            self._running[user] = self._running.get(user, 0) + 1
            if queue:
                self._queues.move_to_end(user)  # served: the other users come first next time
            else:
                del self._queues[user]
        if granted:
            self._lock.notify_all()

    def _withdraw(self, ticket: _Ticket) -> None:
        queue = self._queues.get(ticket.user)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            if not queue:
                del self._queues[ticket.user]
