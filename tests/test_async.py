"""``alock()`` against locks held by other, real processes: the event loop keeps running while
coroutines wait, a cancelled wait is prompt and leaves nothing held nor any thread waiting (a
wait closed, or left pending on a closed loop, too), and a SIGKILLed holder's lock goes to an
``alock()`` waiter at once.

Each test runs on the strategies that matter to it: file, redis, postgres and the database
strategy on a SQLite file, PostgreSQL and MariaDB (skipping a strategy whose server is down,
failing under ISOLATABLE_REQUIRE_SERVICES=1). The other process is a ``tests/workers.py``
``hold`` (or ``take``) worker, which reports each event on stdout. The loop's lag is measured by
a ticker coroutine that sleeps ``TICK`` seconds again and again on the same loop: how late it
wakes is how long the loop was kept from running. A thread still waiting is found by a count of
the threads inside ``CommandIsolation._lock`` (``threads_locking``). Bounds are generous (this
machine is shared): they catch a blocked loop or a thread left waiting, not a slow one;
``benchmarks/eventloop.py`` measures how small the lag and the handoff really are.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from django_isolatable import AlreadyRunning, CommandIsolation, LockGuard
from tests import strategies
from tests.processes import ROOT, Worker, Workers
from tests.strategies import StrategyConfig

T = TypeVar("T")
TICK = 0.01
#: The most the loop may lag at any tick while coroutines wait: a blocked loop lags by a whole
#: wait slice or more; a loop doing its work lags by milliseconds.
MAX_LAG = 0.25
#: How soon a cancelled wait must raise: it is cancelled at 0.3 s.
PROMPT = 0.8
#: How soon every thread of cancelled waits must have stopped waiting.
THREADS_STOP_WITHIN = 2.0
#: A holder's lease: long, so that only its release (or its death) frees its lock.
HOLDER_TTL = 30.0

FILE = strategies.FILE
REDIS = strategies.REDIS
POSTGRES = strategies.POSTGRES
DATABASES = strategies.DATABASE_CONFIGS
WAITING_STORES = [FILE, REDIS, POSTGRES]  # the strategies whose waiters wait in the store
EVERY = [*WAITING_STORES, *DATABASES]


def params(configs: list[StrategyConfig]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        "strategy", [pytest.param(config, id=config.id) for config in configs], indirect=True
    )


@pytest.fixture
def strategy(request, settings, django_db_blocker) -> Iterator[StrategyConfig]:
    """The test's strategy in this process's settings (its server required)."""
    config: StrategyConfig = request.param
    config.require_service()
    settings.ISOLATABLE = {
        **settings.ISOLATABLE,
        "STRATEGY": config.strategy,
        **config.isolatable_settings,
    }
    # The database strategy talks to its database from the worker threads, on connections of
    # their own: pytest-django's blocker must let them.
    with django_db_blocker.unblock():
        CommandIsolation("async:set-up").holder()  # the database strategy makes its table
        yield config


@pytest.fixture
def name(request, strategy: StrategyConfig) -> Iterator[str]:
    """A lock name of the test's own; whatever holds it at the end is force-released."""
    unique = f"async:{request.node.name}:{os.getpid()}:{time.monotonic_ns()}"
    yield unique
    isolation = CommandIsolation(unique)
    isolation.release_all()
    isolation.backend.close()  # postgres: the idle sessions that many waiters opened


@pytest.fixture
def spawn(
    strategy: StrategyConfig, name: str, tmp_path: Path, lock_dir: Path
) -> Iterator[Callable[..., Worker]]:
    """``spawn(command, *options)`` starts a ``tests/workers.py`` worker on ``name`` with the
    strategy's settings; the ones still running at the end are killed."""
    workers = Workers(tmp_path, name, lock_dir)
    isolatable = {"STRATEGY": strategy.strategy, **strategy.isolatable_settings}
    env = {"ISOLATABLE_TEST_SETTINGS": json.dumps({**isolatable, "TTL": HOLDER_TTL})}
    yield lambda command, *options: workers.start(command, *options, env=env)
    workers.close()


def run(scenario: Awaitable[None]) -> None:
    """Run ``scenario`` on a new event loop; a hang fails after a minute."""

    async def bounded() -> None:
        await asyncio.wait_for(scenario, 60)

    asyncio.run(bounded())


async def event(worker: Worker, word: str) -> list[str]:
    """``worker.expect(word)`` off the loop (it blocks until the worker says it)."""
    return await asyncio.to_thread(worker.expect, word)


class Ticker:
    """A coroutine that sleeps ``TICK`` s again and again and records how late it woke."""

    def __init__(self) -> None:
        self.lags: list[float] = []

    async def tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            planned = loop.time() + TICK
            await asyncio.sleep(TICK)
            self.lags.append(loop.time() - planned)

    @property
    def worst(self) -> float:
        return max(self.lags)


@contextlib.asynccontextmanager
async def ticking() -> AsyncIterator[Ticker]:
    """A ``Ticker`` running on this loop for the duration of the block."""
    ticker = Ticker()
    task = asyncio.ensure_future(ticker.tick())
    try:
        yield ticker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Locking:
    """Which threads are inside ``CommandIsolation._lock`` (an attempt, or a wait, of every
    lock call and of ``alock()``'s worker) right now: ``watch`` wraps it to keep count. (Not
    found from the threads' stacks: walking another thread's frames can crash Python 3.11.)"""

    def __init__(self) -> None:
        self.inside: dict[int, str] = {}
        self.mutex = threading.Lock()

    def watch(self, original: Callable[..., LockGuard]) -> Callable[..., LockGuard]:
        @functools.wraps(original)
        def _lock(*args: object, **kwargs: object) -> LockGuard:
            thread = threading.current_thread()
            with self.mutex:
                self.inside[thread.ident or 0] = thread.name
            try:
                return original(*args, **kwargs)
            finally:
                with self.mutex:
                    self.inside.pop(thread.ident or 0, None)

        return _lock

    def threads(self) -> list[str]:
        with self.mutex:
            return list(self.inside.values())


LOCKING = Locking()


@pytest.fixture(autouse=True)
def _watch_locking(monkeypatch) -> None:
    monkeypatch.setattr(CommandIsolation, "_lock", LOCKING.watch(CommandIsolation._lock))


def threads_locking() -> list[str]:
    """The names of the threads of this process now inside a lock attempt or wait."""
    return LOCKING.threads()


async def until(condition: Callable[[], bool], what: str, within: float) -> float:
    """Poll ``condition`` on the loop until true; the seconds it took. Fails after ``within``
    seconds saying ``what`` did not happen."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            pytest.fail(f"{what} did not happen within {within} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def locked(name: str) -> bool:
    """Whether anyone holds ``name`` (asked off the loop: the database strategy refuses)."""
    return await asyncio.to_thread(CommandIsolation(name).is_locked)


def off_the_loop(function: Callable[[], T]) -> T:
    """``function()`` in a thread of its own, blocking the loop until it returns (on purpose:
    the database strategy refuses to run on the loop's thread)."""
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(function()))
    thread.start()
    thread.join(30)
    return results[0]


async def until_free(name: str, within: float) -> None:
    """Poll until nobody holds ``name``; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while await locked(name):
        if time.monotonic() > deadline:
            pytest.fail(f"{name} was still held after {within} s")
        await asyncio.sleep(0.01)


def test_the_ticker_sees_a_blocked_loop():
    """The measurement below can fail: a call that blocks the loop shows as lag."""

    async def scenario() -> None:
        async with ticking() as ticker:
            await asyncio.sleep(0.05)
            time.sleep(0.3)  # a blocking call on the loop
            await asyncio.sleep(0.05)
        assert ticker.worst > 0.25

    run(scenario())


@params(EVERY)
def test_the_loop_keeps_running_while_coroutines_wait_for_another_processes_lock(
    strategy, spawn, name
):
    """While another process holds the lock, ``atry_lock()`` names it, and four coroutines
    wait on ``alock()``; the ticker on the same loop never lags by ``MAX_LAG``. When the
    process releases, the waiters take the lock one after another, each only once the one
    before let go (by leaving ``async with``, or by ``arelease()``). On the database strategy
    this is its every call from a running loop, on SQLite, PostgreSQL and MariaDB."""
    holder = spawn("hold")

    async def scenario() -> None:
        holder_pid, _token = await event(holder, "held")
        held: list[tuple[float, float]] = []

        async def hold_a_while(guard: LockGuard) -> None:
            start = time.monotonic()
            assert guard.info.pid == os.getpid()
            await asyncio.sleep(0.02)
            held.append((start, time.monotonic()))

        async def in_async_with() -> None:
            async with CommandIsolation(name).alock(timeout=30) as guard:
                await hold_a_while(guard)

        async def awaited() -> None:
            guard = await CommandIsolation(name).alock(timeout=30)
            await hold_a_while(guard)
            await guard.arelease()
            assert not guard.lost

        async with ticking() as ticker:
            with pytest.raises(AlreadyRunning) as caught:
                await CommandIsolation(name).atry_lock()
            assert caught.value.holder.pid == int(holder_pid)
            waiters = [asyncio.ensure_future(w()) for w in (in_async_with, awaited) * 2]
            await asyncio.sleep(0.5)
            assert not any(waiter.done() for waiter in waiters)
            released = time.monotonic()
            holder.send("release")
            await asyncio.wait_for(asyncio.gather(*waiters), 20)
            await event(holder, "released")
        held.sort()
        assert len(held) == 4
        assert held[0][0] > released
        for (_, end), (next_start, _) in itertools.pairwise(held):
            assert end <= next_start
        assert len(ticker.lags) > 25
        assert ticker.worst < MAX_LAG, f"the loop lagged {ticker.worst:.3f} s"
        assert not await locked(name)

    run(scenario())


async def by_wait_for(waiting: Awaitable[LockGuard]) -> None:
    with pytest.raises(asyncio.TimeoutError):  # TimeoutError from Python 3.11 on
        await asyncio.wait_for(waiting, 0.3)


async def by_task_cancel(waiting: Awaitable[LockGuard]) -> None:
    task = asyncio.ensure_future(waiting)
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def by_asyncio_timeout(waiting: Awaitable[LockGuard]) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await waiting


CANCELLATIONS = [by_wait_for, by_task_cancel]
if sys.version_info >= (3, 11):
    CANCELLATIONS.append(by_asyncio_timeout)


@params([*WAITING_STORES, strategies.DATABASE_ON_SQLITE])
def test_cancelled_waits_are_prompt_and_leave_no_lock_held_and_no_thread_waiting(
    strategy, spawn, name
):
    """While another process holds the lock:

    - 32 coroutines wait on ``alock()``, each in a worker thread (all 32 seen waiting: the
      check sees a waiting thread); cancelled together, every thread stopped waiting within
      ``THREADS_STOP_WITHIN`` s, the loop never lagged by ``MAX_LAG``, the lock is still the
      other process's;
    - ``alock(timeout=None)`` cancelled at 0.3 s by ``asyncio.wait_for``, ``task.cancel()``
      and ``asyncio.timeout()`` raises well under a second later.

    Last, a wait whose thread takes the lock just before the wait is cancelled (the race a
    cancellation can always lose) lets the lock go at once: another process takes it.
    """
    holder = spawn("hold")
    successor = spawn("take")
    waiters = 32

    async def scenario() -> None:
        holder_pid, _token = await event(holder, "held")
        await event(successor, "ready")
        async with ticking() as ticker:
            tasks = [
                asyncio.ensure_future(CommandIsolation(name).alock(timeout=None))
                for _ in range(waiters)
            ]
            await until(lambda: len(threads_locking()) == waiters, "32 waits", within=10)
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(result, asyncio.CancelledError) for result in results)
            took = await until(
                lambda: not threads_locking(), "the waiting threads' end", THREADS_STOP_WITHIN
            )
        assert took < THREADS_STOP_WITHIN
        assert ticker.worst < MAX_LAG, f"the loop lagged {ticker.worst:.3f} s"
        successor.send("try")
        assert await event(successor, "busy") == [holder_pid]

        for cancel in CANCELLATIONS:
            started = time.monotonic()
            await cancel(CommandIsolation(name).alock(timeout=None))
            took = time.monotonic() - started
            assert took < PROMPT, f"{cancel.__name__}: raised after {took:.2f} s"
        await until(lambda: not threads_locking(), "the cancelled waits' end", 2.0)

        task = asyncio.ensure_future(CommandIsolation(name).alock(timeout=None))
        await until(lambda: len(threads_locking()) == 1, "the last wait", within=10)
        holder.send("release")
        # The loop is blocked on purpose until the wait's thread has the lock: the task is
        # cancelled before it can see that it got it.
        deadline = time.monotonic() + 10
        while threads_locking() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert off_the_loop(CommandIsolation(name).holder).pid == os.getpid()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await event(holder, "released")
        await until_free(name, 2.0)
        successor.send("try")
        await event(successor, "took")

    run(scenario())


@params([FILE, REDIS, POSTGRES, strategies.DATABASE_ON_SQLITE])
def test_an_alock_waiter_takes_over_from_a_sigkilled_holder_at_once(strategy, spawn, name):
    """A holder SIGKILLed while a coroutine waits: the waiter has the lock within a second or
    two, long before the holder's 30 s lease (file: the kernel freed the lock; redis and the
    database: the holder ran on this host and its pid is gone; postgres: its session ended)."""
    holder = spawn("hold")

    async def scenario() -> None:
        await event(holder, "held")
        waiter = asyncio.ensure_future(CommandIsolation(name).alock(timeout=HOLDER_TTL))
        await until(lambda: bool(threads_locking()), "the waiter's wait", within=10)
        await asyncio.sleep(0.2)
        assert not waiter.done()
        killed = time.monotonic()
        await asyncio.to_thread(holder.kill)
        guard = await asyncio.wait_for(waiter, HOLDER_TTL / 2)
        assert time.monotonic() - killed < 2.0
        assert guard.info.pid == os.getpid()
        assert (await asyncio.to_thread(CommandIsolation(name).holder)).token == guard.info.token
        await guard.arelease()

    run(scenario())


@params([FILE])
def test_alock_runs_as_a_task_and_a_dropped_wait_stops(strategy, name):
    """``alock()`` is a coroutine to asyncio: ``asyncio.create_task`` and a ``TaskGroup`` run
    it. A wait closed (``close()``, as when its coroutine is finalized) before it got the lock
    stops its thread within a slice and never takes the lock."""

    async def scenario() -> None:
        guard = await asyncio.create_task(CommandIsolation(name).alock(timeout=5))
        assert guard.info.pid == os.getpid()
        locking = CommandIsolation(name).alock(timeout=None)
        locking.send(None)  # the wait begins: its thread waits for the lock held above
        await until(lambda: len(threads_locking()) == 1, "the wait", within=10)
        locking.close()
        await until(lambda: not threads_locking(), "the closed wait's end", THREADS_STOP_WITHIN)
        await guard.arelease()
        await asyncio.sleep(0.2)
        assert not await locked(name)
        if sys.version_info >= (3, 11):
            async with asyncio.TaskGroup() as group:
                first = group.create_task(CommandIsolation(f"{name}:1").alock(timeout=5))
                second = group.create_task(CommandIsolation(f"{name}:2").alock(timeout=5))
            for task in (first, second):
                await task.result().arelease()

    run(scenario())


ABANDONING = """
import asyncio, sys, django
django.setup()
from django_isolatable import CommandIsolation
name, lock_dir = sys.argv[1:]
held = CommandIsolation(name, lock_dir=lock_dir).lock()
loop = asyncio.new_event_loop()
waiting = loop.create_task(CommandIsolation(name, lock_dir=lock_dir).alock(timeout=None))
loop.run_until_complete(asyncio.sleep(0.3))
loop.close()  # the task still pending
print("abandoned", flush=True)
"""


def test_a_wait_left_pending_on_a_closed_loop_stops(lock_dir):
    """A process that closes its loop while an ``alock()`` task is still pending (never
    cancelled: ``asyncio.wait(..., timeout=)`` leaves tasks so), its wait for a lock the
    process itself holds, exits within seconds: the interpreter joins the worker threads at
    exit, and the waiting one stops within a slice of the loop's closing."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", ABANDONING, "async:abandoned", str(lock_dir)],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "abandoned\n"), result.stderr
    assert time.monotonic() - started < 10
