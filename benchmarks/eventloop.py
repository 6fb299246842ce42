"""Async code: how long the event loop is kept from running while coroutines wait on
``alock()``, and how soon a coroutine waiting on ``alock()`` holds a lock that another process
released.

Loop lag: another process holds 8 locks; 8 coroutines wait on them with ``alock()`` (each wait
runs in a worker thread), while a ticker coroutine on the same loop sleeps ``TICK`` again and
again and records how late it woke. The group's raw limit is the same ticker with nothing
waiting: what the machine's scheduling alone costs. The control between them: the same 8
waiters in a process of their own, the ticker alone here. What they cost the machine shows
there; only what exceeds it is this process's loop being held up (the GIL, a blocking call).

Handoff: as in ``handoff``, but the waiter in the other process is a coroutine awaiting
``alock()`` on a running loop, next to the raw limit and to a ``lock()`` waiter measured in the
same run. The holds spread over ``ASYNC_SLICE``, the longest a worker thread waits in the store
before it looks whether its wait was cancelled, so releases fall at every phase of a slice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any, NamedTuple, TypeVar

from benchmarks import candidates, environment, handoff, processes
from benchmarks.candidates import WAIT_LIMIT, Candidate, Lockable
from benchmarks.report import Group, Row, median, percentile, print_table, ratio
from django_isolatable.isolation import ASYNC_SLICE

T = TypeVar("T")
TICK = 0.005
WAITERS = 8
#: Seconds for the waiters' threads to be in their waits before the ticks count.
SETTLE = 0.3


class Waited(NamedTuple):
    """A strategy whose locks the coroutines wait for."""

    label: str
    strategy: str
    needs: tuple[str, ...]
    isolatable: dict[str, str]


LAG_GROUPS = [
    ("file", "File locks", [Waited("file strategy", "file", (), {})]),
    ("redis", "Redis", [Waited("redis strategy", "redis", ("redis",), {})]),
    (
        "postgres",
        "PostgreSQL",
        [
            Waited("postgres strategy", "postgres", ("postgres",), {}),
            Waited(
                "database strategy (PostgreSQL)",
                "database",
                ("postgres",),
                {"DATABASE_ALIAS": "postgres"},
            ),
        ],
    ),
]


def _holder(connection: Connection, waited: Waited, slugs: list[str]) -> None:
    isolations = [environment.isolation(s, waited.strategy, **waited.isolatable) for s in slugs]
    guards = [isolation.try_lock() for isolation in isolations]
    connection.send("held")
    connection.recv()
    for guard in guards:
        guard.release()
    connection.send("released")


async def _ticks(seconds: float) -> list[float]:
    """How late (ms) each ``TICK`` s sleep of ``seconds`` of them woke."""
    loop = asyncio.get_running_loop()
    lags = []
    end = loop.time() + seconds
    while loop.time() < end:
        planned = loop.time() + TICK
        await asyncio.sleep(TICK)
        lags.append((loop.time() - planned) * 1000)
    return lags


async def _waiting(isolations: list[Any], during: Awaitable[T]) -> T:
    """``during``'s result, awaited while a coroutine per isolation waits on ``alock()``."""
    waiters = [asyncio.ensure_future(i.alock(timeout=None)) for i in isolations]
    await asyncio.sleep(SETTLE)
    try:
        return await during
    finally:
        for waiter in waiters:
            waiter.cancel()
        outcomes = await asyncio.gather(*waiters, return_exceptions=True)
        if not all(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes):
            raise RuntimeError(f"a waiter got a lock another process held: {outcomes}")


def _waiters_elsewhere(connection: Connection, waited: Waited, slugs: list[str]) -> None:
    """The control: the same waiters, in a process of their own, until told to stop."""
    isolations = [environment.isolation(s, waited.strategy, **waited.isolatable) for s in slugs]

    async def told() -> None:
        connection.send("waiting")
        await asyncio.to_thread(connection.recv)

    asyncio.run(_waiting(isolations, told()))
    connection.send("stopped")


class Lags(NamedTuple):
    """The ticker's lags (ms): on the idle loop; while the waiters wait in another process (the
    machine's extra load, without sharing this process); while they wait on this loop."""

    idle: list[float]
    elsewhere: list[float]
    here: list[float]


def measure_lag(waited: Waited, slug: str, seconds: float) -> Lags:
    """``seconds`` of ticks each way, the locks held by another process all along."""
    slugs = [f"{slug}-{number}" for number in range(WAITERS)]
    with processes.workers(_holder, 1, waited, slugs) as (holder,):
        processes.receive(holder)
        idle = asyncio.run(_ticks(seconds))
        with processes.workers(_waiters_elsewhere, 1, waited, slugs) as (other,):
            processes.receive(other)
            elsewhere = asyncio.run(_ticks(seconds))
            other.send(True)
            processes.receive(other)
        isolations = [environment.isolation(s, waited.strategy, **waited.isolatable) for s in slugs]
        here = asyncio.run(_waiting(isolations, _ticks(seconds)))
        holder.send(True)
        processes.receive(holder)
    return Lags(idle, elsewhere, here)


def _lag_cells(lags: list[float]) -> list[str]:
    return [
        f"{median(lags):.2f}",
        f"{percentile(lags, 0.99):.2f}",
        f"{max(lags):.2f}",
        str(len(lags)),
    ]


def run_lag(seconds: float) -> dict[str, list[float]]:
    """Measure and print the loop lag of every group; the lags (ms) by "group key/label"."""
    results: dict[str, list[float]] = {}
    groups = []
    for key, title, members in LAG_GROUPS:
        group = Group(f"{title} (raw: the ticker alone, on the idle loop)")
        base = 0.0
        for number, waited in enumerate(members):
            reason = next(filter(None, map(environment.unavailable, waited.needs)), None)
            if reason:
                group.skipped.append(f"{waited.label}: {reason}")
                continue
            lags = measure_lag(waited, f"loop-lag-{key}-{number}", seconds)
            if not group.rows:  # the group's raw limit: its first member's idle loop
                results[f"{key}/idle loop"] = lags.idle
                group.rows.append(Row("idle loop", _lag_cells(lags.idle), 1.0))
                base = percentile(lags.idle, 0.99)
            results[f"{key}/{waited.label}, elsewhere"] = lags.elsewhere
            results[f"{key}/{waited.label}"] = lags.here
            for label, values in (
                (f"{WAITERS} waiters in another process, {waited.label}", lags.elsewhere),
                (f"{WAITERS} alock() waiters on this loop, {waited.label}", lags.here),
            ):
                group.rows.append(
                    Row(label, _lag_cells(values), ratio(percentile(values, 0.99), base))
                )
        groups.append(group)
    print_table(
        f"Event-loop lag, ms a {TICK * 1000:g} ms sleep woke late, while {WAITERS} coroutines wait "
        f"on alock() for locks another process holds ({seconds:g} s of ticks; x raw: of p99)",
        ["median", "p99", "max", "ticks"],
        groups,
    )
    return results


def _alock(strategy: str, **isolatable: str) -> Callable[[str], Lockable]:
    """``alock()`` awaited on an event loop of the process's own; ``acquire`` returns once the
    coroutine has the lock. ``release`` is the plain ``release()``: the holder releases as in
    the ``lock()`` row (an ``arelease()`` would add its own hop to a worker thread), and the
    waiter releases after its time was taken."""

    def open_lock(slug: str) -> Lockable:
        isolation = environment.isolation(slug, strategy, **isolatable)
        loop = asyncio.new_event_loop()
        guards: list[Any] = []

        async def take() -> Any:
            return await isolation.alock(timeout=WAIT_LIMIT)

        return Lockable(
            lambda: guards.append(loop.run_until_complete(take())),
            lambda: guards.pop().release(),
            loop.close,
        )

    return open_lock


def _alock_candidate(label: str, strategy: str, needs: tuple[str, ...]) -> Candidate:
    return Candidate(f"alock(), {label}", _alock(strategy), ASYNC_SLICE, needs)


ALOCK_FILE = _alock_candidate("file strategy", "file", ())
ALOCK_REDIS = _alock_candidate("redis strategy", "redis", ("redis",))
ALOCK_POSTGRES = _alock_candidate("postgres strategy", "postgres", ("postgres",))

HANDOFF_GROUPS = [
    (
        "file",
        "File locks (raw: blocking flock)",
        [candidates.RAW_FLOCK, candidates.FILE, ALOCK_FILE],
    ),
    (
        "redis",
        "Redis (raw: SET NX + BLPOP wake-up)",
        [candidates.RAW_REDIS, candidates.REDIS, ALOCK_REDIS],
    ),
    (
        "postgres",
        "PostgreSQL (raw: blocking pg_advisory_lock)",
        [candidates.RAW_ADVISORY, candidates.POSTGRES, ALOCK_POSTGRES],
    ),
]


def run_handoff(trials: int, longest_span: float) -> dict[str, list[float]]:
    """Measure and print the handoff to an ``alock()`` waiter; latencies (ms) by "group
    key/label"."""
    results, groups = handoff.measure_groups(HANDOFF_GROUPS, trials, longest_span, "async")
    print_table(
        f"Handoff to an alock() waiter, ms from release() in another process to the coroutine "
        f"holding the lock ({trials} trials, holds of {handoff.HOLD_AT_LEAST * 1000:g} ms + up "
        f"to {min(longest_span, ASYNC_SLICE) * 1000:g} ms)",
        ["median", "p90", "max"],
        groups,
    )
    return results


def run(
    trials: int, lag_seconds: float, longest_span: float
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Both measurements: (loop lags, alock() handoff latencies), each by "group key/label"."""
    return run_lag(lag_seconds), run_handoff(trials, longest_span)
