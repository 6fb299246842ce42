"""Lease renewal: one thread per process renews every held lease every TTL/3.

Taking a lock only registers its lease here (no thread is started per lock); for the usual
lease, due after the thread's next look anyway, registering and removing it are one set
operation each, without a lock or a wake-up. A lease found lost (expired, taken, its session
gone) marks its guard lost; a store that cannot be reached is retried until the lease must have
expired. Guards are held weakly, so a dropped guard is still garbage collected, and released.
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


class Renewal:
    """One lease to renew; ``Renewer.add`` returns it, ``Renewer.remove`` ends it."""

    __slots__ = ("backend", "due", "guard", "lease", "removed", "renewed", "ttl")

    def __init__(self, guard: LockGuard, backend: Backend, lease: Lease, ttl: float) -> None:
        now = time.monotonic()
        self.guard = weakref.ref(guard)
        self.backend = backend
        self.lease = lease
        self.ttl = ttl
        self.due = now + ttl / 3  # monotonic time of the next renewal
        self.renewed = now  # monotonic time of the last successful one
        self.removed = False


class Renewer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # Added to and removed from by the threads that take and release locks (set.add and
        # set.discard are atomic), read by the renewal thread as a copy (list() of a set is
        # atomic too). A renewal leaves it when its lock is released, never later: objects
        # that outlived their lock would make the garbage collector run on a busy process.
        self._renewals: set[Renewal] = set()
        self._thread: threading.Thread | None = None
        self._asleep_until = 0.0  # when the thread wakes up next on its own (monotonic)

    def add(self, guard: LockGuard, backend: Backend, lease: Lease, ttl: float) -> Renewal:
        """Renew ``lease`` every ``ttl / 3`` seconds until ``remove`` is called with what this
        returns."""
        renewal = Renewal(guard, backend, lease, ttl)
        if self._thread is not None and ttl / 3 >= IDLE_WAKE:
            # The thread looks at least every IDLE_WAKE seconds, so it finds this one before it
            # is due without being woken (a thread switch, tens of µs on a busy host).
            self._renewals.add(renewal)
            return renewal
        with self._lock:
            self._renewals.add(renewal)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="isolatable-renewal", daemon=True
                )
                self._thread.start()
            elif renewal.due < self._asleep_until:  # asleep, and would wake too late
                self._changed.notify()
        return renewal

    def remove(self, renewal: Renewal) -> None:
        """Stop renewing ``renewal``."""
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
            self.remove(renewal)
        if guard is not None and not held:
            guard._mark_lost()

    def _forget_after_fork(self) -> None:
        # The parent's leases are not the child's to renew, and its thread did not survive.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._renewals.clear()
        self._thread = None
        self._asleep_until = 0.0


renewer = Renewer()
os.register_at_fork(after_in_child=renewer._forget_after_fork)
