"""The signals of ``django_isolatable.signals`` on every path: an ``IsolatableCommand`` run with
``call_command``, the ``isolated`` decorator (sync and async), the lock API and its async form.

Receivers run in the process that locks, so the holders that make a run skip or be taken over
are real other processes (``tests/workers.py``): a live one holding the lock, or one killed
with SIGKILL on the database strategy over a SQLite file, whose same-host dead pid is taken over
at once. ``lock_overdue`` (MAX_AGE) is tested in tests/test_overdue.py; here on the async paths
only. Each signal also meets a receiver that raises: Django logs it (``django.dispatch``)
and the lock is unchanged.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.dispatch import Signal

from django_isolatable import (
    AlreadyRunning,
    CommandIsolation,
    LockGuard,
    LockInfo,
    LockTimeout,
    isolated,
)
from django_isolatable.signals import (
    lock_acquired,
    lock_lost,
    lock_overdue,
    lock_released,
    lock_skipped,
    lock_taken_over,
)
from tests.processes import Worker
from tests.settings import KEY_PREFIX

SIGNALS = {
    "acquired": lock_acquired,
    "released": lock_released,
    "skipped": lock_skipped,
    "taken_over": lock_taken_over,
    "lost": lock_lost,
    "overdue": lock_overdue,
}
#: The leased strategy whose dead holders are taken over at once (same host, pid gone).
SQLITE_DATABASE = {"STRATEGY": "database", "DATABASE_ALIAS": "sqlite", "KEY_PREFIX": KEY_PREFIX}
#: Lets go of a lock behind its holder's back, so the holder finds it lost.
MEMORY = {"STRATEGY": "memory"}


@dataclass
class Sent:
    signal: str
    sender: Any
    kwargs: dict[str, Any]


class Received:
    """Every signal of this module, as received; and receivers the test adds, all disconnected
    at the end."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self._connected: list[tuple[Signal, Callable[..., Any]]] = []
        for key, signal in SIGNALS.items():
            self.connect(signal, self._recorder(key))

    def _recorder(self, key: str) -> Callable[..., None]:
        def record(sender: Any, signal: Signal, **kwargs: Any) -> None:
            self.sent.append(Sent(key, sender, kwargs))

        return record

    def connect(self, signal: Signal, receiver: Callable[..., Any]) -> None:
        signal.connect(receiver, weak=False)
        self._connected.append((signal, receiver))

    def raising(self, key: str) -> None:
        """Add a receiver of ``key`` that raises (connected before the recorder runs, or
        after: send_robust calls every receiver whatever another did)."""

        def broken_receiver(sender: Any, **kwargs: Any) -> None:
            raise RuntimeError(f"broken {key} receiver")

        self.connect(SIGNALS[key], broken_receiver)

    def of(self, name: str, *keys: str) -> list[Sent]:
        """The signals sent about lock ``name`` (of ``keys`` only, if given), in order."""
        return [s for s in self.sent if s.kwargs["name"] == name and (not keys or s.signal in keys)]

    def keys(self, name: str) -> list[str]:
        return [s.signal for s in self.of(name)]

    def one(self, name: str, key: str) -> Sent:
        (sent,) = self.of(name, key)
        return sent

    def close(self) -> None:
        for signal, receiver in self._connected:
            signal.disconnect(receiver)


@pytest.fixture
def received() -> Iterator[Received]:
    recorder = Received()
    try:
        yield recorder
    finally:
        recorder.close()


@pytest.fixture
def spawn(tmp_path: Path, lock_dir: Path) -> Iterator[Callable[..., Worker]]:
    """``spawn(name, settings)`` starts a ``hold`` worker on ``name`` with those ISOLATABLE
    settings and returns it once it holds the lock; killed at the end if still running."""
    started: list[Worker] = []

    def start(name: str, isolatable: dict[str, Any] | None = None) -> Worker:
        env = {"ISOLATABLE_TEST_SETTINGS": json.dumps(isolatable or {})}
        stderr = tmp_path / f"holder-{len(started)}.stderr"
        worker = Worker(stderr, "hold", name, str(lock_dir), env=env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


@pytest.fixture
def sqlite_database(settings, django_db_blocker) -> Iterator[None]:
    settings.ISOLATABLE = {**settings.ISOLATABLE, **SQLITE_DATABASE}
    with django_db_blocker.unblock():
        yield


def dispatch_errors(caplog: pytest.LogCaptureFixture, key: str) -> list[logging.LogRecord]:
    """The errors Django logged for the broken receiver of ``key``."""
    return [
        r
        for r in caplog.records
        if r.name == "django.dispatch"
        and r.levelno == logging.ERROR
        and f"broken {key} receiver" in r.getMessage()
        and r.exc_info is not None
    ]


def assert_acquired_and_released(received: Received, name: str, at_least: float = 0.0) -> None:
    """One ``lock_acquired`` then one ``lock_released`` for ``name``, with the documented
    arguments, the same guard and its isolation as sender."""
    assert received.keys(name) == ["acquired", "released"]
    acquired, released = received.of(name)
    guard = acquired.kwargs["guard"]
    assert isinstance(guard, LockGuard)
    assert set(acquired.kwargs) == {"name", "guard", "waited"}
    assert set(released.kwargs) == {"name", "guard", "held_for"}
    assert released.kwargs["guard"] is guard
    assert guard.info.name == name
    assert guard.info.pid == os.getpid()
    for sent in (acquired, released):
        assert isinstance(sent.sender, CommandIsolation)
        assert sent.sender is guard.isolation
        assert sent.sender.name == name
    assert isinstance(acquired.kwargs["waited"], float)
    assert acquired.kwargs["waited"] >= 0
    assert isinstance(released.kwargs["held_for"], float)
    assert released.kwargs["held_for"] >= at_least


def assert_skipped(received: Received, name: str, holder_pid: int) -> LockInfo:
    """Exactly one ``lock_skipped`` for ``name`` (and nothing else), naming the holder."""
    assert received.keys(name) == ["skipped"]
    sent = received.one(name, "skipped")
    assert set(sent.kwargs) == {"name", "holder"}
    assert isinstance(sent.sender, CommandIsolation)
    assert sent.sender.name == name
    holder = sent.kwargs["holder"]
    assert isinstance(holder, LockInfo)
    assert holder.pid == holder_pid
    assert holder.alive is True
    return holder


# lock_acquired and lock_released


def test_command_run_sends_acquired_then_released(received):
    call_command("isolated_echo", key="sig", seconds=0.1, stdout=io.StringIO())
    assert_acquired_and_released(received, "isolated_echo:sig", at_least=0.1)


def test_decorated_call_sends_acquired_then_released(received):
    inside = []

    @isolated("decorated-signals")
    def job() -> str:
        inside.append(received.keys("decorated-signals"))
        return "ran"

    assert job() == "ran"
    assert_acquired_and_released(received, "decorated-signals")
    assert job() == "ran"
    assert inside == [["acquired"], ["acquired", "released", "acquired"]]
    senders = {id(s.sender) for s in received.of("decorated-signals")}
    assert len(senders) == 1  # the same isolation for each call of the function


def test_decorated_coroutine_sends_acquired_then_released(received):
    @isolated("async-decorated-signals")
    async def job() -> str:
        await asyncio.sleep(0.05)
        return "ran"

    assert asyncio.run(job()) == "ran"
    assert_acquired_and_released(received, "async-decorated-signals", at_least=0.05)


@pytest.mark.parametrize("take", ["lock", "try_lock", "lock_with_timeout"])
def test_lock_api_sends_acquired_then_released(received, take):
    isolation = CommandIsolation(f"api-{take}")
    guard = getattr(isolation, take)(*([5] if take == "lock_with_timeout" else []))
    assert received.keys(isolation.name) == ["acquired"]
    assert received.one(isolation.name, "acquired").sender is isolation
    guard.release()
    guard.release()  # idempotent: sent once
    assert_acquired_and_released(received, isolation.name)


def test_alock_and_arelease_send_acquired_then_released(received):
    isolation = CommandIsolation("async-api-signals")

    async def scenario() -> None:
        guard = await isolation.alock(timeout=5)
        assert received.keys(isolation.name) == ["acquired"]
        await guard.arelease()
        async with isolation.atry_lock():
            pass

    asyncio.run(scenario())
    assert received.keys(isolation.name) == ["acquired", "released", "acquired", "released"]
    assert_acquired_and_released_pairs(received, isolation)


def assert_acquired_and_released_pairs(received: Received, isolation: CommandIsolation) -> None:
    sent = received.of(isolation.name)
    for acquired, released in zip(sent[::2], sent[1::2], strict=True):
        assert acquired.sender is released.sender is isolation
        assert released.kwargs["guard"] is acquired.kwargs["guard"]
        assert acquired.kwargs["waited"] >= 0
        assert released.kwargs["held_for"] >= 0


def test_waited_is_the_time_spent_waiting_for_the_lock(received):
    holder = CommandIsolation("waited-for").try_lock()

    async def scenario() -> LockGuard:
        waiter = asyncio.ensure_future(CommandIsolation("waited-for").alock(timeout=10))
        await asyncio.sleep(0.3)
        await holder.arelease()
        return await waiter

    guard = asyncio.run(scenario())
    guard.release()
    acquired = received.of("waited-for", "acquired")
    assert [s.kwargs["waited"] >= 0.25 for s in acquired] == [False, True]


def test_a_raising_acquired_receiver_is_logged_and_the_lock_is_held(received, caplog):
    received.raising("acquired")
    with caplog.at_level(logging.ERROR, "django.dispatch"):
        guard = CommandIsolation("broken-acquired").try_lock()
    assert len(dispatch_errors(caplog, "acquired")) == 1
    assert CommandIsolation("broken-acquired").is_locked()
    with pytest.raises(AlreadyRunning):
        CommandIsolation("broken-acquired").try_lock()
    guard.release()
    assert not CommandIsolation("broken-acquired").is_locked()
    assert received.keys("broken-acquired") == ["acquired", "skipped", "released"]


def test_a_raising_released_receiver_is_logged_and_the_lock_is_released(received, caplog):
    received.raising("released")

    @isolated("broken-released")
    def job() -> str:
        return "ran"

    with caplog.at_level(logging.ERROR, "django.dispatch"):
        assert job() == "ran"
        call_command("isolated_echo", key="broken-released", stdout=io.StringIO())
    assert len(dispatch_errors(caplog, "released")) == 2
    for name in ("broken-released", "isolated_echo:broken-released"):
        assert not CommandIsolation(name).is_locked()
        CommandIsolation(name).try_lock().release()
        assert received.keys(name) == ["acquired", "released", "acquired", "released"]


# lock_skipped: a lock call that gave up without the lock, whether the caller skips or raises.


def test_command_skipped_for_a_holder_in_another_process(received, spawn):
    name = "isolated_echo:held-elsewhere"
    holder = spawn(name)
    holder.expect("held")
    with pytest.raises(AlreadyRunning):
        call_command("isolated_echo", key="held-elsewhere", stdout=io.StringIO())
    assert_skipped(received, name, holder.pid)
    with pytest.raises(LockTimeout):
        call_command("isolated_echo", key="held-elsewhere", wait=0.2, stdout=io.StringIO())
    assert received.keys(name) == ["skipped", "skipped"]
    holder.finish()


def test_decorated_calls_skipped_or_raising_send_skipped(received, spawn):
    @isolated("decorated-skip")
    def skipping() -> None:
        pytest.fail("ran while held")

    @isolated("decorated-skip", if_running="raise", timeout=0.1)
    async def raising() -> None:
        pytest.fail("ran while held")

    holder = spawn("decorated-skip")
    holder.expect("held")
    assert skipping() is None
    assert_skipped(received, "decorated-skip", holder.pid)
    with pytest.raises(LockTimeout):
        asyncio.run(raising())
    assert received.keys("decorated-skip") == ["skipped", "skipped"]
    holder.finish()


def test_lock_api_and_async_api_send_skipped(received):
    held = CommandIsolation("api-skip").try_lock()
    isolation = CommandIsolation("api-skip")
    with pytest.raises(AlreadyRunning):
        isolation.try_lock()
    with pytest.raises(LockTimeout):
        isolation.lock(timeout=0.1)

    async def scenario() -> None:
        with pytest.raises(AlreadyRunning):
            await isolation.atry_lock()
        with pytest.raises(LockTimeout):
            await isolation.alock(timeout=0.1)

    asyncio.run(scenario())
    skipped = received.of("api-skip", "skipped")
    assert len(skipped) == 4
    for sent in skipped:
        assert sent.sender is isolation
        assert sent.kwargs["holder"].token == held.info.token
    held.release()


def test_a_cancelled_alock_is_not_a_skip(received):
    held = CommandIsolation("cancelled-wait").try_lock()

    async def scenario() -> None:
        waiter = asyncio.ensure_future(CommandIsolation("cancelled-wait").alock(timeout=None))
        await asyncio.sleep(0.2)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(0.3)  # the worker thread gives up within a slice

    asyncio.run(scenario())
    held.release()
    assert received.keys("cancelled-wait") == ["acquired", "released"]


def test_a_raising_skipped_receiver_is_logged_and_the_call_still_skips(received, caplog):
    received.raising("skipped")
    ran = []

    @isolated("broken-skipped")
    def job() -> None:
        ran.append(1)

    held = CommandIsolation("broken-skipped").try_lock()
    with caplog.at_level(logging.ERROR, "django.dispatch"):
        assert job() is None
        with pytest.raises(AlreadyRunning):
            CommandIsolation("broken-skipped").try_lock()
    assert ran == []
    assert len(dispatch_errors(caplog, "skipped")) == 2
    assert CommandIsolation("broken-skipped").holder().token == held.info.token
    held.release()


# lock_taken_over: the lock of a holder killed with SIGKILL (database strategy, SQLite file).


def test_every_path_takes_over_a_sigkilled_holder_and_says_so(
    received, spawn, sqlite_database, caplog
):
    tag = f"{os.getpid()}-{os.urandom(4).hex()}"
    names = {path: f"{path}-{tag}" for path in ("decorated", "async-decorated", "api", "async-api")}
    names["command"] = f"isolated_echo:{tag}"
    holders = {path: spawn(name, SQLITE_DATABASE) for path, name in names.items()}
    dead = {}
    for path, holder in holders.items():
        holder.expect("held")
        holder.kill()
        dead[path] = holder.pid
    received.raising("taken_over")  # and a broken receiver changes nothing

    @isolated(names["decorated"])
    def job() -> str:
        return "ran"

    @isolated(names["async-decorated"])
    async def async_job() -> str:
        return "ran"

    async def async_api() -> None:
        async with CommandIsolation(names["async-api"]).atry_lock():
            pass

    try:
        with caplog.at_level(logging.ERROR, "django.dispatch"):
            call_command("isolated_echo", key=tag, stdout=io.StringIO())
            assert job() == "ran"
            assert asyncio.run(async_job()) == "ran"
            CommandIsolation(names["api"]).try_lock().release()
            asyncio.run(async_api())
    finally:
        for name in names.values():
            CommandIsolation(name).release_all()

    assert len(dispatch_errors(caplog, "taken_over")) == len(names)
    for path, name in names.items():
        assert received.keys(name) == ["taken_over", "acquired", "released"], path
        taken_over, acquired, _ = received.of(name)
        assert set(taken_over.kwargs) == {"name", "previous"}
        assert taken_over.sender is acquired.sender
        assert isinstance(taken_over.sender, CommandIsolation)
        previous = taken_over.kwargs["previous"]
        assert isinstance(previous, LockInfo)
        assert previous.name == name
        assert previous.pid == dead[path]
        assert previous.alive is False
        assert previous.token != acquired.kwargs["guard"].info.token


# lock_lost: a held lock found gone (here force-released behind its holder's back).


def let_go_behind_its_back(received: Received, name: str) -> None:
    """When ``name`` is acquired, force-release it, as ``locks release --force`` would."""

    def take_away(sender: CommandIsolation, guard: LockGuard, **kwargs: Any) -> None:
        if kwargs["name"] == name:
            CommandIsolation(name).release_all()

    received.connect(lock_acquired, take_away)


def assert_lost(received: Received, name: str) -> LockGuard:
    assert received.keys(name) == ["acquired", "lost"]
    acquired, lost = received.of(name)
    assert set(lost.kwargs) == {"name", "guard"}
    guard = lost.kwargs["guard"]
    assert guard is acquired.kwargs["guard"]
    assert guard.lost is True
    assert isinstance(lost.sender, CommandIsolation)
    assert lost.sender is guard.isolation
    return guard


def test_command_whose_lock_is_taken_away_sends_lost_and_fails(received, settings):
    settings.ISOLATABLE = {**settings.ISOLATABLE, **MEMORY}
    let_go_behind_its_back(received, "isolated_echo:lost")
    with pytest.raises(CommandError, match="lost"):
        call_command("isolated_echo", key="lost", stdout=io.StringIO())
    assert_lost(received, "isolated_echo:lost")


def test_decorated_calls_whose_lock_is_taken_away_send_lost(received, settings):
    settings.ISOLATABLE = {**settings.ISOLATABLE, **MEMORY}
    let_go_behind_its_back(received, "decorated-lost")
    let_go_behind_its_back(received, "async-decorated-lost")

    @isolated("decorated-lost")
    def job() -> str:
        return "ran"

    @isolated("async-decorated-lost")
    async def async_job() -> str:
        return "ran"

    assert job() == "ran"
    assert asyncio.run(async_job()) == "ran"
    assert_lost(received, "decorated-lost")
    assert_lost(received, "async-decorated-lost")


def test_api_and_async_api_guards_whose_lock_is_taken_away_send_lost(received, settings):
    settings.ISOLATABLE = {**settings.ISOLATABLE, **MEMORY}
    received.raising("lost")
    guard = CommandIsolation("api-lost").try_lock()
    CommandIsolation("api-lost").release_all()
    successor = CommandIsolation("api-lost").try_lock()
    guard.release()  # finds it gone: lost, and the successor's lock is untouched
    assert CommandIsolation("api-lost").holder().token == successor.info.token
    successor.release()

    async def scenario() -> None:
        async with CommandIsolation("async-api-lost").atry_lock():
            CommandIsolation("async-api-lost").release_all()

    asyncio.run(scenario())
    sent = received.of("api-lost")
    assert [s.signal for s in sent] == ["acquired", "acquired", "lost", "released"]
    assert sent[2].kwargs["guard"] is guard
    assert guard.lost is True
    assert successor.lost is False
    assert_lost(received, "async-api-lost")


def test_a_raising_lost_receiver_is_logged_and_the_guard_is_still_lost(received, settings, caplog):
    settings.ISOLATABLE = {**settings.ISOLATABLE, **MEMORY}
    received.raising("lost")
    guard = CommandIsolation("broken-lost").try_lock()
    CommandIsolation("broken-lost").release_all()
    with caplog.at_level(logging.ERROR, "django.dispatch"):
        guard.release()
    assert len(dispatch_errors(caplog, "lost")) == 1
    assert guard.lost is True
    assert_lost(received, "broken-lost")
    assert not CommandIsolation("broken-lost").is_locked()


# lock_overdue on the async paths (the others: tests/test_overdue.py).


def test_async_calls_that_give_up_on_an_overdue_holder_send_skipped_then_overdue(
    received, settings, caplog
):
    settings.ISOLATABLE = {**settings.ISOLATABLE, "MAX_AGE": 0.2}
    received.raising("overdue")

    @isolated("async-overdue")
    async def job() -> None:
        pytest.fail("ran while held")

    async def scenario() -> None:
        with pytest.raises(AlreadyRunning) as young:
            await CommandIsolation("async-overdue").atry_lock()
        assert young.value.overdue_age is None
        await asyncio.sleep(0.4)
        with pytest.raises(AlreadyRunning) as old:
            await CommandIsolation("async-overdue").atry_lock()
        assert old.value.overdue_age > 0.2
        assert await job() is None

    held = CommandIsolation("async-overdue").try_lock()
    with caplog.at_level(logging.ERROR, "django.dispatch"):
        asyncio.run(scenario())
    assert received.keys("async-overdue") == [
        "acquired",
        "skipped",
        "skipped",
        "overdue",
        "skipped",
        "overdue",
    ]
    for sent in received.of("async-overdue", "overdue"):
        assert set(sent.kwargs) == {"name", "holder", "age"}
        assert isinstance(sent.sender, CommandIsolation)
        assert sent.kwargs["holder"].token == held.info.token
        assert isinstance(sent.kwargs["age"], float)
        assert sent.kwargs["age"] > 0.2
    assert len(dispatch_errors(caplog, "overdue")) == 2
    assert CommandIsolation("async-overdue").holder().token == held.info.token  # kept
    held.release()
