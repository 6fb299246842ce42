"""Lease renewal: one thread per process renews every held lease every TTL/3.

Taking a lock only registers its lease here (no thread is started per lock). A lease found
lost (expired, taken, its session gone) marks its guard lost; a store that cannot be reached
is retried until the lease must have expired. Guards are held weakly, so a dropped guard is
still garbage collected, and released.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django_isolatable.backends import Backend, Lease
from django_isolatable.errors import IsolationError

if TYPE_CHECKING:
    from django_isolatable.isolation import LockGuard

logger = logging.getLogger(__name__)

#: Longest sleep of the renewal thread, in seconds, even with nothing due.
IDLE_WAKE = 1.0


@dataclass
class _Renewal:
    guard: weakref.ref[LockGuard]
    backend: Backend
    lease: Lease
    ttl: float
    due: float  # monotonic time of the next renewal
    renewed: float  # monotonic time of the last successful one


class Renewer:
    def __init__(self) -> None:
        # add and remove, on every lock, take the plain lock (a Condition's own methods run in
        # Python); the thread waits on the Condition built on it.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._renewals: dict[int, _Renewal] = {}
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None
        self._asleep_until = 0.0  # when the thread wakes up next on its own (monotonic)

    def add(self, guard: LockGuard, backend: Backend, lease: Lease, ttl: float) -> int:
        """Renew ``lease`` until ``remove`` is called with the key returned."""
        now = time.monotonic()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="isolatable-renewal", daemon=True
                )
                self._thread.start()
            key = next(self._keys)
            due = now + ttl / 3
            self._renewals[key] = _Renewal(weakref.ref(guard), backend, lease, ttl, due, now)
            if due < self._asleep_until:  # asleep and would wake too late: waking it costs a
                self._changed.notify()  # thread switch, tens of microseconds on a busy host
        return key

    def remove(self, key: int) -> None:
        with self._lock:
            self._renewals.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._changed:
                due = self._wait_for_due()
                for _, renewal in due:
                    renewal.due = time.monotonic() + renewal.ttl / 3
            for key, renewal in due:
                self._renew(key, renewal)

    def _wait_for_due(self) -> list[tuple[int, _Renewal]]:
        while True:
            now = time.monotonic()
            due = [(key, r) for key, r in self._renewals.items() if r.due <= now]
            if due:
                return due
            # Idle, it still looks every IDLE_WAKE seconds, so taking a lock with a longer
            # renewal interval need not wake it (most locks: the default TTL is 60 s).
            next_due = min((r.due for r in self._renewals.values()), default=now + IDLE_WAKE)
            self._asleep_until = min(next_due, now + IDLE_WAKE)
            self._changed.wait(self._asleep_until - now)
            self._asleep_until = 0.0

    def _renew(self, key: int, renewal: _Renewal) -> None:
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
            self.remove(key)
        if guard is not None and not held:
            guard._mark_lost()

    def _forget_after_fork(self) -> None:
        # The parent's leases are not the child's to renew, and its thread did not survive.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._renewals.clear()
        self._thread = None


renewer = Renewer()
os.register_at_fork(after_in_child=renewer._forget_after_fork)
