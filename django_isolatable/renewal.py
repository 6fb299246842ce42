"""Lease renewal: one thread per process renews every held lease every TTL/3.

Taking a lock only registers its lease here (no thread is started per lock). The usual lease is
due after the thread's next look anyway (it looks at least every IDLE_WAKE seconds): registering
it is one dict entry the thread takes in when it looks, and a lock released before that (most
are) never costs the thread anything; neither registering nor removing takes a lock or wakes the
thread. A lease found lost (expired, taken, its session gone) marks its guard lost; a store that
cannot be reached is retried until the lease must have expired. Guards are held weakly, so a
dropped guard is still garbage collected, and released.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING

from django_isolatable.backends import Backend, Lease
from django_isolatable.errors import IsolationError

if TYPE_CHECKING:
    from django_isolatable.isolation import LockGuard

logger = logging.getLogger(__name__)

#: Longest sleep of the renewal thread, in seconds, even with nothing due.
IDLE_WAKE = 1.0

#: What ``add`` registers: the guard (weakly), its backend and lease, the TTL (None: the
#: backend's), and when the lease was taken (monotonic).
_Entry = tuple["weakref.ref[LockGuard]", Backend, Lease, "float | None", float]


class Renewal:
    """One lease the renewal thread renews (``LockGuard._renewal`` once taken in)."""

    __slots__ = ("backend", "due", "guard", "lease", "removed", "renewed", "ttl")

    def __init__(self, entry: _Entry) -> None:
        self.guard, self.backend, self.lease, ttl, taken = entry
        self.ttl = self.backend.options.ttl if ttl is None else ttl
        self.due = taken + self.ttl / 3  # monotonic time of the next renewal
        self.renewed = taken  # monotonic time of the last successful one
        self.removed = False


class Renewer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # Registered leases the thread has not taken in yet, by id of their guard, and those it
        # renews. Locking threads add to and remove from both with single dict and set
        # operations (atomic); the thread reads copies. An entry leaves when its lock is
        # released, never later: objects that outlived their lock would make the garbage
        # collector run on a process that locks often.
        self._new: dict[int, _Entry] = {}
        self._renewals: set[Renewal] = set()
        self._thread: threading.Thread | None = None
        self._asleep_until = 0.0  # when the thread wakes up next on its own (monotonic)

    def add(self, guard: LockGuard, backend: Backend, lease: Lease, ttl: float | None) -> None:
        """Renew ``lease`` every ``ttl / 3`` seconds until ``remove(guard)``. ``ttl`` None: a
        lease that does not expire and is only checked (postgres), every backend TTL / 3."""
        entry = (weakref.ref(guard), backend, lease, ttl, time.monotonic())
        if self._thread is not None and (ttl is None or ttl / 3 >= IDLE_WAKE):
            self._new[id(guard)] = entry  # the thread looks before the lease is due
            return
        with self._lock:
            renewal = self._take_in(guard, entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="isolatable-renewal", daemon=True
                )
                self._thread.start()
            elif renewal.due < self._asleep_until:  # asleep, and would wake too late
                self._changed.notify()

    def remove(self, guard: LockGuard) -> None:
        """Stop renewing ``guard``'s lease. The guard is marked released before this."""
        if self._new.pop(id(guard), None) is None:  # taken in by the thread already
            renewal = guard._renewal
            if renewal is not None:
                self._forget(renewal)

    def _take_in(self, guard: LockGuard, entry: _Entry) -> Renewal:
        renewal = Renewal(entry)
        guard._renewal = renewal
        self._renewals.add(renewal)
        if guard._released:  # released while this ran: its remove() may have missed it
            self._forget(renewal)
        return renewal

    def _forget(self, renewal: Renewal) -> None:
        renewal.removed = True  # in case the thread is about to renew it
        self._renewals.discard(renewal)

    def _run(self) -> None:
        while True:
            with self._changed:
                due = self._wait_for_due()
            for renewal in due:
                self._renew(renewal)

    def _wait_for_due(self) -> list[Renewal]:
        while True:
            for key in list(self._new):
                entry = self._new.pop(key, None)
                if entry is None:  # released meanwhile
                    continue
                guard = entry[0]()
                if guard is not None:
                    self._take_in(guard, entry)
            renewals = list(self._renewals)
            now = time.monotonic()
            due = [r for r in renewals if r.due <= now]
            if due:
                for renewal in due:
                    renewal.due = now + renewal.ttl / 3
                return due
            # Idle, it still looks every IDLE_WAKE seconds, so taking a lock with a longer
            # renewal interval need not wake it (most locks: the default TTL is 60 s).
            next_due = min((r.due for r in renewals), default=now + IDLE_WAKE)
            self._asleep_until = min(next_due, now + IDLE_WAKE)
            self._changed.wait(self._asleep_until - now)
            self._asleep_until = 0.0

    def _renew(self, renewal: Renewal) -> None:
        if renewal.removed:  # released while the others due before it were renewed
            return
        try:
            held = renewal.backend.refresh(renewal.lease, renewal.ttl)
        except IsolationError as e:
            logger.warning("Could not renew lock %s: %s", renewal.lease.name, e)
            held = time.monotonic() - renewal.renewed < renewal.ttl
        else:
            if held:
                renewal.renewed = time.monotonic()
        guard = renewal.guard()
        if guard is None or not held:
            self._forget(renewal)
        if guard is not None and not held:
            guard._mark_lost()

    def _forget_after_fork(self) -> None:
        # The parent's leases are not the child's to renew, and its thread did not survive.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._new.clear()
        self._renewals.clear()
        self._thread = None
        self._asleep_until = 0.0


renewer = Renewer()
os.register_at_fork(after_in_child=renewer._forget_after_fork)
