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
    """What the renewer needs of a guard: a weak reference, its renewal once taken in, whether
    it was released, and being told it lost its lease."""

    lost = False
    _renewal = None
    _released = False

    def _mark_lost(self) -> None:
        self.lost = True

    def release(self, renewer: Renewer) -> None:
        self._released = True
        renewer.remove(self)  # type: ignore[arg-type]


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
    assert LONG_TTL / 3 >= IDLE_WAKE  # registered without the thread's lock or a wake-up
    renewer = Renewer()
    guards = [Guard() for _ in range(4)]
    first, kept, unexpiring, dropped = (lease(backend, n) for n in ("1st", "kept", "un", "drop"))
    renewer.add(guards[0], backend, first, LONG_TTL)  # starts the thread
    renewer.add(guards[1], backend, kept, LONG_TTL)
    renewer.add(guards[2], backend, unexpiring, None)  # checked every backend TTL / 3
    renewer.add(guards[3], backend, dropped, LONG_TTL)
    guards[3].release(renewer)
    renewed = RenewedMemoryBackend.renewed
    for taken in (first, kept, unexpiring):
        event = renewed.setdefault(taken.token, threading.Event())
        assert event.wait(LONG_TTL), f"{taken.name} was not renewed within its TTL"
    assert dropped.token not in renewed, "a lease released before the thread looked was renewed"
    guards[1].release(renewer)  # after the thread took it in
    renewed[kept.token].clear()
    assert not renewed[kept.token].wait(LONG_TTL / 3 + IDLE_WAKE), "renewed after its release"
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
