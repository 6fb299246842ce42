"""The renewal thread: leases renewed in time, released ones never again, nothing left behind."""

from __future__ import annotations

import gc
import threading
from typing import ClassVar

import pytest

from django_isolatable import CommandIsolation
from django_isolatable.backends.base import Lease
from django_isolatable.backends.memory import MemoryBackend
from django_isolatable.renewal import IDLE_WAKE, Renewer

#: Renewed every TTL / 3 = 1.1 s: later than the renewal thread's next look (IDLE_WAKE), so
#: registering it neither takes the thread's lock nor wakes the thread.
LONG_TTL = 3.3


class RenewedMemoryBackend(MemoryBackend):
    """The memory strategy with a heartbeat: every renewal is recorded."""

    heartbeat: ClassVar[bool] = True
    renewed: ClassVar[dict[str, threading.Event]] = {}

    def refresh(self, lease: Lease, ttl: float) -> bool:
        self.renewed.setdefault(lease.token, threading.Event()).set()
        return super().refresh(lease, ttl)


class Guard:
    """What the renewer needs of a guard: a weak reference, and being told it lost its lease."""

    lost = False

    def _mark_lost(self) -> None:
        self.lost = True


@pytest.fixture
def backend(settings, tmp_path):
    settings.ISOLATABLE = {"STRATEGY": f"{__name__}.RenewedMemoryBackend", "TTL": LONG_TTL}
    RenewedMemoryBackend.renewed.clear()
    return CommandIsolation("renewal").backend


def lease(backend: MemoryBackend, name: str) -> Lease:
    from django_isolatable.holders import new_record

    taken = backend.acquire(name, new_record(name, backend.strategy))
    assert taken is not None
    return taken


def test_a_lease_registered_without_waking_the_thread_is_renewed_before_it_expires(backend):
    assert LONG_TTL / 3 >= IDLE_WAKE  # the registration without lock or wake-up
    renewer = Renewer()
    guards = [Guard(), Guard(), Guard()]
    first = lease(backend, "first")
    renewer.add(guards[0], backend, first, LONG_TTL)  # starts the thread
    kept, dropped = lease(backend, "kept"), lease(backend, "dropped")
    renewer.add(guards[1], backend, kept, LONG_TTL)
    renewer.remove(renewer.add(guards[2], backend, dropped, LONG_TTL))
    renewed = RenewedMemoryBackend.renewed
    event = renewed.setdefault(kept.token, threading.Event())
    assert event.wait(LONG_TTL), "not renewed within its TTL"
    assert renewed.setdefault(first.token, threading.Event()).wait(LONG_TTL)
    assert dropped.token not in renewed, "a removed lease was renewed"
    assert not any(guard.lost for guard in guards)


def test_a_released_lock_leaves_no_object_behind(backend):
    """Everything a lock makes while held goes when it is released, not later: survivors would
    make the garbage collector run, over the whole heap, on a process that locks often."""
    isolation = CommandIsolation("no-leftovers")
    for _ in range(100):  # caches filled, renewal thread started
        isolation.lock().release()
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        for _ in range(2000):
            isolation.lock().release()
        grown = len(gc.get_objects()) - before
    finally:
        gc.enable()
    assert grown < 100, f"{grown} objects outlived 2000 released locks"
