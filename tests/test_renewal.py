"""Lease renewal: leases renewed in time, cancelled ones never again, a lost or unconfirmed lease
reported once, one stuck store never delaying another's, nothing left behind."""

from __future__ import annotations

import gc
import logging
import threading
from typing import ClassVar

import pytest

from django_isolatable import CommandIsolation
from django_isolatable.backends.base import Lease
from django_isolatable.backends.memory import MemoryBackend
from django_isolatable.holders import new_record
from django_isolatable.renewal import IDLE_WAKE, Renewer
from django_isolatable.signals import lock_lost

#: Renewed every TTL / 3 = 1.1 s: later than the scheduler's next look (IDLE_WAKE), so
#: registering it neither takes the scheduler's lock nor wakes it.
LONG_TTL = 3.3
SHORT_TTL = 1.2


class RenewedMemoryBackend(MemoryBackend):
    """The memory strategy with a heartbeat: every renewal is recorded, and a lease whose lock
    is no longer held is reported lost."""

    heartbeat: ClassVar[bool] = True
    renewed: ClassVar[dict[str, threading.Event]] = {}

    def refresh(self, lease: Lease, ttl: float) -> bool:
        self.renewed.setdefault(lease.token, threading.Event()).set()
        holder = (self.inspect(lease.name) or [None])[0]
        return holder is not None and holder.token == lease.token


class StuckBackend(RenewedMemoryBackend):
    """A store that stops answering: ``refresh`` blocks until ``unstick`` is set."""

    unstick = threading.Event()
    entered = threading.Event()

    def store(self) -> str:
        return "stuck"

    def refresh(self, lease: Lease, ttl: float) -> bool:
        self.entered.set()
        self.unstick.wait()
        return True


class Lost:
    """An ``on_lost`` callback that remembers being called."""

    def __init__(self) -> None:
        self.called = threading.Event()
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        self.called.set()


@pytest.fixture
def backend(settings):
    settings.ISOLATABLE = {"STRATEGY": f"{__name__}.RenewedMemoryBackend", "TTL": LONG_TTL}
    RenewedMemoryBackend.renewed.clear()
    return CommandIsolation("renewal").backend


def lease(backend: MemoryBackend, name: str) -> Lease:
    taken = backend.acquire(name, new_record(name, backend.strategy))
    assert taken is not None
    return taken


def test_leases_are_renewed_before_they_expire_and_never_after_cancel(backend):
    assert LONG_TTL / 3 >= IDLE_WAKE  # registered without the scheduler's lock or a wake-up
    renewer = Renewer()
    first, kept, unexpiring, dropped = (lease(backend, n) for n in ("1st", "kept", "un", "drop"))
    lost = Lost()
    handles = [
        renewer.start(backend, first, LONG_TTL, lost),  # starts the scheduler
        renewer.start(backend, kept, LONG_TTL, lost),
        renewer.start(backend, unexpiring, None, lost),  # checked every backend TTL / 3
        renewer.start(backend, dropped, LONG_TTL, lost),
    ]
    handles[3].cancel()
    renewed = RenewedMemoryBackend.renewed
    for taken in (first, kept, unexpiring):
        event = renewed.setdefault(taken.token, threading.Event())
        assert event.wait(LONG_TTL), f"{taken.name} was not renewed within its TTL"
    assert dropped.token not in renewed, "a lease cancelled before it was due was renewed"
    handles[1].cancel()
    renewed[kept.token].clear()
    assert not renewed[kept.token].wait(LONG_TTL / 3 + IDLE_WAKE), "renewed after its cancel"
    assert lost.calls == 0
    for handle in handles:
        handle.cancel()
    for taken in (first, kept, unexpiring, dropped):
        backend.release(taken)


def test_a_lease_found_lost_is_reported_once_and_no_longer_renewed(backend):
    renewer = Renewer()
    taken = lease(backend, "taken-away")
    lost = Lost()
    handle = renewer.start(backend, taken, SHORT_TTL, lost)
    backend.force_release("taken-away")
    assert lost.called.wait(SHORT_TTL + IDLE_WAKE), "the lost lease was not reported"
    renewed = RenewedMemoryBackend.renewed[taken.token]
    renewed.clear()
    assert not renewed.wait(SHORT_TTL), "a lost lease was renewed again"
    assert lost.calls == 1
    handle.cancel()


def test_a_stuck_store_delays_no_other_store_and_its_lease_is_lost_at_its_ttl(backend):
    """A store that stops answering (a black hole) holds up only its own worker: a lease in a
    healthy store goes on being renewed, and the stuck store's lease is reported lost once its
    TTL ran out unconfirmed, although the call never returns."""
    renewer = Renewer()
    stuck_backend = StuckBackend(backend.options)
    StuckBackend.unstick.clear()
    StuckBackend.entered.clear()
    stuck, healthy = lease(stuck_backend, "stuck"), lease(backend, "healthy")
    stuck_lost, healthy_lost = Lost(), Lost()
    handles = [
        renewer.start(stuck_backend, stuck, SHORT_TTL, stuck_lost),
        renewer.start(backend, healthy, SHORT_TTL, healthy_lost),
    ]
    try:
        assert StuckBackend.entered.wait(SHORT_TTL), "the stuck store was never asked"
        renewed = RenewedMemoryBackend.renewed.setdefault(healthy.token, threading.Event())
        for _ in range(4):  # renewed every TTL/3 while the other store hangs
            renewed.clear()
            assert renewed.wait(SHORT_TTL), "the healthy lease was not renewed"
        assert stuck_lost.called.wait(SHORT_TTL), "the unconfirmed lease was never reported"
        assert healthy_lost.calls == 0
    finally:
        StuckBackend.unstick.set()
        for handle in handles:
            handle.cancel()
        backend.release(healthy)
        stuck_backend.release(stuck)


def test_a_raising_lock_lost_receiver_is_logged_and_renewal_goes_on(backend, caplog):
    """A receiver of ``lock_lost`` that raises is logged; the other receivers still get the
    signal and every other lease of the process is still renewed."""
    seen: list[str] = []

    def broken(sender: object, **kwargs: object) -> None:
        raise RuntimeError("receiver bug")

    def counting(sender: object, name: str, **kwargs: object) -> None:
        seen.append(name)

    lock_lost.connect(broken, weak=False)
    lock_lost.connect(counting, weak=False)
    try:
        lost_guard = CommandIsolation("lost-one", ttl=SHORT_TTL).try_lock()
        kept_guard = CommandIsolation("kept-one", ttl=SHORT_TTL).try_lock()
        with caplog.at_level(logging.ERROR, logger="django_isolatable"):
            CommandIsolation("lost-one").release_all()
            renewed = RenewedMemoryBackend.renewed.setdefault(
                kept_guard.info.token, threading.Event()
            )
            for _ in range(4):
                renewed.clear()
                assert renewed.wait(SHORT_TTL), "renewal stopped after a receiver raised"
        assert lost_guard.lost is True
        assert seen == ["lost-one"]
        assert "receiver bug" in caplog.text
        assert kept_guard.lost is False
        kept_guard.release()
        lost_guard.release()
    finally:
        lock_lost.disconnect(broken)
        lock_lost.disconnect(counting)


def test_a_released_lock_leaves_no_object_behind(backend):
    """Everything a lock makes while held goes when it is released, not later: survivors would
    make the garbage collector run, over the whole heap, on a process that locks often."""
    isolation = CommandIsolation("no-leftovers")
    for _ in range(100):  # caches filled, renewal threads started
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
