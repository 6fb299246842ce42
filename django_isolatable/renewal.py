"""Lease renewal: every held lease of a heartbeat strategy is renewed (or checked) every TTL/3.

``start()`` returns a ``Renewal``, the handle its guard cancels on release; a lease found lost is
reported through the ``on_lost`` callback the guard passed in. Nothing else crosses between the
two.

One scheduler thread keeps the time and does no I/O: it hands due renewals to one worker thread
per store (``Backend.store()``), so a store that stops answering delays only its own leases, and
it reports a lease lost once its TTL has run out since the last renewal the store confirmed,
whether or not the store ever answers. Taking a lock only registers its lease: the scheduler
looks at new ones at least every ``IDLE_WAKE`` seconds, so a lock released before its first
renewal is due (most are) never wakes a thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable

from django_isolatable.backends import Backend, Lease
from django_isolatable.errors import IsolationError

logger = logging.getLogger(__name__)

#: Longest sleep of the scheduler, in seconds, even with nothing due.
IDLE_WAKE = 1.0


class Renewal:
    """One registered lease; ``cancel()`` stops its renewal (idempotent)."""

    __slots__ = (
        "backend",
        "deadline",
        "due",
        "in_flight",
        "lease",
        "on_lost",
        "renewer",
        "stopped",
        "ttl",
    )

    def __init__(
        self,
        renewer: Renewer,
        backend: Backend,
        lease: Lease,
        ttl: float,
        on_lost: Callable[[], None],
    ) -> None:
        now = time.monotonic()
        self.renewer = renewer
        self.backend = backend
        self.lease = lease
        self.ttl = ttl
        self.on_lost = on_lost
        self.due = now + ttl / 3  # monotonic time of the next renewal
        self.deadline = now + ttl  # the lease must be taken as lost from then on
        self.in_flight = False  # a worker has it
        self.stopped = False

    def cancel(self) -> None:
        """Stop renewing; a renewal under way finishes but reports nothing."""
        self.stopped = True
        self.renewer._renewals.discard(self)

    def _renewed(self, started: float) -> None:
        # The store extended the lease when it got the call, after ``started``: counting from
        # then never believes the lease lasts longer than the store does.
        self.deadline = started + self.ttl
        self.due = started + self.ttl / 3

    def _lost(self) -> None:
        if self.stopped:
            return
        self.cancel()
        try:
            self.on_lost()
        except Exception:  # the callback sends signals robustly; never let it stop renewals
            logger.exception("Reporting the lost lock %s failed", self.lease.name)


class Renewer:
    """The scheduler and the store workers of this process (one instance, ``renewer``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Single set operations from locking threads, copies read by the scheduler.
        self._renewals: set[Renewal] = set()
        self._workers: dict[str, queue.SimpleQueue[Renewal]] = {}
        self._thread: threading.Thread | None = None

    def start(
        self, backend: Backend, lease: Lease, ttl: float | None, on_lost: Callable[[], None]
    ) -> Renewal:
        """Renew ``lease`` every ``ttl / 3`` seconds until the handle is cancelled. ``ttl`` None:
        a lease that does not expire and is only checked (postgres), every backend TTL / 3.
        ``on_lost()`` is called once, from a renewal thread, if the lease is found lost or its
        TTL runs out unconfirmed."""
        renewal = Renewal(
            self, backend, lease, backend.options.ttl if ttl is None else ttl, on_lost
        )
        self._renewals.add(renewal)
        # Due before the scheduler's next look, it must be told (under its lock, so it cannot
        # have just read the set without this one); otherwise the next look finds it in time.
        if self._thread is None or renewal.ttl / 3 < IDLE_WAKE:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._schedule, name="isolatable-renewal", daemon=True
                    )
                    self._thread.start()
                self._wake.notify()
        return renewal

    def _schedule(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                renewals = list(self._renewals)
                next_event = now + IDLE_WAKE
                for renewal in renewals:
                    next_event = min(next_event, renewal.deadline)
                    if not renewal.in_flight:
                        next_event = min(next_event, renewal.due)
                if next_event > now:
                    self._wake.wait(next_event - now)
                    continue
            for renewal in renewals:
                now = time.monotonic()
                if renewal.stopped:
                    continue
                if now >= renewal.deadline:
                    logger.warning(
                        "Lock %s: its store did not confirm the lease within its TTL (%s s)",
                        renewal.lease.name,
                        renewal.ttl,
                    )
                    renewal._lost()
                elif now >= renewal.due and not renewal.in_flight:
                    renewal.in_flight = True
                    self._worker(renewal.backend).put(renewal)

    def _worker(self, backend: Backend) -> queue.SimpleQueue[Renewal]:
        store = f"{backend.strategy}:{backend.store()}"
        work = self._workers.get(store)
        if work is None:
            work = self._workers[store] = queue.SimpleQueue()
            threading.Thread(
                target=self._renew_from,
                args=(work,),
                name=f"isolatable-renewal {store}",
                daemon=True,
            ).start()
        return work

    def _renew_from(self, work: queue.SimpleQueue[Renewal]) -> None:
        while True:
            renewal = work.get()
            try:
                if not renewal.stopped:
                    _renew(renewal)
            finally:
                with self._wake:  # its next renewal is due before the scheduler's next look
                    renewal.in_flight = False
                    self._wake.notify()

    def _forget_after_fork(self) -> None:
        # The parent's leases are not the child's to renew, and its threads did not survive.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._renewals = set()
        self._workers = {}
        self._thread = None


def _renew(renewal: Renewal) -> None:
    started = time.monotonic()
    try:
        held = renewal.backend.refresh(renewal.lease, renewal.ttl)
    except Exception as e:  # a backend's bug too: this worker renews other leases as well
        # Tried again soon; the scheduler reports the lease lost once its TTL ran out.
        logger.warning(
            "Could not renew lock %s: %s",
            renewal.lease.name,
            e,
            exc_info=not isinstance(e, IsolationError),
        )
        renewal.due = time.monotonic() + renewal.ttl / 6
        return
    if held:
        renewal._renewed(started)
    else:
        renewal._lost()


renewer = Renewer()
os.register_at_fork(after_in_child=renewer._forget_after_fork)
