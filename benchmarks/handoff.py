"""Handoff latency: from a holder calling release() in one process to a waiter in another,
blocked in the lock's own wait, returning from acquire().

The holder keeps the lock for a random time, at least 20 ms and spread over the longest poll
interval in the group, so a polling waiter's attempts fall at every phase of its cycle, as in
real life. Every lock of a group gets the same spread: how long a process slept changes how soon
it answers (on the 2-CPU VM of docs/performance.md, a round trip to Redis after 20-40 ms idle takes
0.4 ms, after up to 0.27 s 1 ms), so a lock measured after shorter holds would look faster.
Both processes read the same monotonic clock.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from benchmarks import candidates, processes
from benchmarks.candidates import Candidate, Lockable
from benchmarks.report import Group, Row, median, percentile, print_table, ratio

HOLD_AT_LEAST = 0.02

GROUPS = [
    (
        "file",
        "File locks (raw: blocking flock)",
        [candidates.RAW_FLOCK, candidates.FILE, candidates.FILELOCK, candidates.PORTALOCKER],
    ),
    (
        "redis",
        "Redis (raw: SET NX + BLPOP wake-up)",
        [
            candidates.RAW_REDIS,
            candidates.REDIS,
            candidates.CACHE,
            candidates.REDIS_PY,
            candidates.PYTHON_REDIS_LOCK,
        ],
    ),
    (
        "postgres",
        "PostgreSQL (raw: blocking pg_advisory_lock)",
        [candidates.RAW_ADVISORY, candidates.POSTGRES, candidates.DATABASE],
    ),
]


def _waiter(connection: Connection, open_lock: Callable[[str], Lockable], slug: str) -> None:
    lock = open_lock(slug)
    connection.send("ready")
    while connection.recv():
        connection.send("waiting")
        lock.acquire()
        acquired = time.monotonic()
        lock.release()
        connection.send(acquired)
    lock.close()


def measure(
    candidate: Candidate,
    slug: str,
    trials: int,
    span: float,
    waiter_open: Callable[[str], Lockable] | None = None,
) -> list[float]:
    """Milliseconds from release() to the waiter having the lock, one per trial, after holds of
    HOLD_AT_LEAST plus up to ``span`` seconds. The waiter opens the lock with ``waiter_open``
    (another kind of hold of the same name), by default as the holder does."""
    latencies = []
    with processes.workers(_waiter, 1, waiter_open or candidate.open, slug) as (waiter,):
        processes.receive(waiter)
        lock = candidate.open(slug)
        try:
            for _ in range(trials):
                lock.acquire()
                waiter.send(True)
                processes.receive(waiter)  # it calls acquire() next, and blocks
                time.sleep(HOLD_AT_LEAST + random.uniform(0, span))
                released = time.monotonic()
                lock.release()
                latencies.append((processes.receive(waiter) - released) * 1000)
            waiter.send(False)
        finally:
            lock.close()
    return latencies


def measure_groups(
    groups: list[tuple[str, str, list[Candidate]]], trials: int, longest_span: float, prefix: str
) -> tuple[dict[str, list[float]], list[Group]]:
    """Measure every candidate of ``groups`` (key, title, members; the first member is the raw
    limit); the latencies (ms) by "group key/label", and the groups to print (median, p90,
    max)."""
    results: dict[str, list[float]] = {}
    printed = []
    for key, title, members in groups:
        group = Group(title)
        base: float | None = None
        span = min(max(max(c.poll for c in members), HOLD_AT_LEAST), longest_span)
        for candidate in members:
            reason = candidates.missing(candidate)
            if reason:
                group.skipped.append(f"{candidate.label}: {reason}")
                continue
            slug = f"{prefix}-{key}-{len(results)}"
            latencies = measure(candidate, slug, trials, span)
            results[f"{key}/{candidate.label}"] = latencies
            value = median(latencies)
            if candidate is members[0]:
                base = value
            cells = [f"{value:.2f}", f"{percentile(latencies, 0.9):.2f}", f"{max(latencies):.2f}"]
            group.rows.append(Row(candidate.label, cells, ratio(value, base)))
        printed.append(group)
    return results, printed


def run(trials: int, longest_span: float) -> dict[str, list[float]]:
    """Measure and print every group; return the latencies (ms) by "group key/label"."""
    results, groups = measure_groups(GROUPS, trials, longest_span, "handoff")
    print_table(
        f"Handoff latency, ms from release() to the waiter holding the lock ({trials} trials, "
        f"holds of {HOLD_AT_LEAST * 1000:g} ms + up to {longest_span * 1000:g} ms)",
        ["median", "p90", "max"],
        groups,
    )
    return results
