"""Contention: N processes each take the lock K times and increment a shared counter under it.

The counter is a read-modify-write on a file that nothing else protects, so it ends at exactly
N x K only if the lock excluded every time. Throughput is acquisitions per second from the first
worker's start to the last one's end; the worst wait is the longest single acquire() call.

Each worker takes and releases the lock once before the start, so no row counts opening its
connections (the raw rows open theirs in ``open()``, the strategies on their first lock).

A row lasts about half a second, and this VM's speed moves by a third from one half second to
the next, so a group is measured in rounds, its rows taking turns; a row shows the round of its
median throughput, its worst wait is the worst of all rounds, and its counter had to end exact
in every round.

"cpu µs" is the workers' own CPU time per acquisition: on a machine with fewer CPUs than
contenders, what a lock costs its waiters and holders in CPU (waking, retrying, encoding)
limits its throughput as much as its round trips do.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier

from benchmarks import candidates, environment, processes
from benchmarks.candidates import Candidate
from benchmarks.report import Group, Row, percentile, print_table, ratio

COUNTER_WIDTH = 20

GROUPS = [
    (
        "file",
        "File locks (raw: blocking flock)",
        [candidates.RAW_FLOCK, candidates.FILE, candidates.FILELOCK],
    ),
    (
        "redis",
        "Redis (raw: SET NX + BLPOP wake-up)",
        [
            candidates.RAW_REDIS,
            candidates.REDIS,
            candidates.REDIS_PY,
            candidates.PYTHON_REDIS_LOCK,
            candidates.CACHE,
        ],
    ),
    (
        "postgres",
        "PostgreSQL (raw: blocking pg_advisory_lock)",
        [
            candidates.RAW_ADVISORY,
            candidates.RAW_ADVISORY_RECORDED,
            candidates.POSTGRES,
            candidates.DATABASE,
        ],
    ),
]


@dataclass
class Outcome:
    throughput: float  # acquisitions per second
    worst_wait: float  # ms
    p99_wait: float  # ms
    exact: bool  # the counter ended at processes x acquisitions
    cpu: float  # µs of the workers' own CPU time per acquisition (the servers' not included)


def _contender(
    connection: Connection,
    candidate: Candidate,
    slug: str,
    counter: str,
    acquisitions: int,
    start: Barrier,
) -> None:
    lock = candidate.open(slug)
    lock.acquire()  # once before the start: connections open, as the raw rows' are in open()
    lock.release()
    fd = os.open(counter, os.O_RDWR)
    start.wait(candidates.WAIT_LIMIT)
    started, cpu = time.monotonic(), time.process_time()
    waits = []
    for _ in range(acquisitions):
        asked = time.monotonic()
        lock.acquire()
        waits.append(time.monotonic() - asked)
        value = int(os.pread(fd, COUNTER_WIDTH, 0))
        os.pwrite(fd, b"%0*d" % (COUNTER_WIDTH, value + 1), 0)
        lock.release()
    connection.send((started, time.monotonic(), waits, time.process_time() - cpu))
    os.close(fd)
    lock.close()


def measure(candidate: Candidate, slug: str, count: int, acquisitions: int) -> Outcome:
    environment.lock_name(slug)  # the workers' lock: remembered here for the cleanup
    counter = environment.work_file(f"{slug}.counter")
    with open(counter, "wb") as f:
        f.write(b"0" * COUNTER_WIDTH)
    start = processes.CONTEXT.Barrier(count)
    with processes.workers(
        _contender, count, candidate, slug, counter, acquisitions, start
    ) as pipes:
        reports = [processes.receive(pipe) for pipe in pipes]
    with open(counter, "rb") as f:
        final = int(f.read())
    elapsed = max(end for _, end, _, _ in reports) - min(started for started, *_ in reports)
    waits = [wait * 1000 for _, _, worker_waits, _ in reports for wait in worker_waits]
    return Outcome(
        throughput=count * acquisitions / elapsed,
        worst_wait=max(waits),
        p99_wait=percentile(waits, 0.99),
        exact=final == count * acquisitions,
        cpu=sum(cpu for *_, cpu in reports) / (count * acquisitions) * 1e6,
    )


def _combined(outcomes: list[Outcome]) -> Outcome:
    """The round of median throughput, with the worst wait of all rounds."""
    middle = sorted(outcomes, key=lambda outcome: outcome.throughput)[len(outcomes) // 2]
    return replace(
        middle,
        worst_wait=max(outcome.worst_wait for outcome in outcomes),
        exact=all(outcome.exact for outcome in outcomes),
    )


def run(count: int, acquisitions: int, rounds: int = 1) -> dict[str, Outcome]:
    """Measure and print every group; return the outcomes by "group key/label"."""
    results: dict[str, Outcome] = {}
    groups = []
    for key, title, members in GROUPS:
        group = Group(title)
        present = []
        for candidate in members:
            reason = candidates.missing(candidate)
            if reason:
                group.skipped.append(f"{candidate.label}: {reason}")
            else:
                present.append(candidate)
        measured: dict[str, list[Outcome]] = {candidate.label: [] for candidate in present}
        for turn in range(rounds):
            for number, candidate in enumerate(present):
                slug = f"contention-{key}-{number}-{turn}"
                measured[candidate.label].append(measure(candidate, slug, count, acquisitions))
        base: float | None = None
        for candidate in present:
            outcome = results[f"{key}/{candidate.label}"] = _combined(measured[candidate.label])
            if candidate is members[0]:
                base = outcome.throughput
            cells = [
                f"{outcome.throughput:.0f}",
                f"{outcome.p99_wait:.1f}",
                f"{outcome.worst_wait:.1f}",
                f"{outcome.cpu:.0f}",
                "yes" if outcome.exact else "NO",
            ]
            group.rows.append(Row(candidate.label, cells, ratio(outcome.throughput, base)))
        groups.append(group)
    print_table(
        f"Contention, {count} processes x {acquisitions} acquisitions, counter incremented "
        f"under the lock; median of {rounds} round{'s' if rounds != 1 else ''}",
        ["acq/s", "p99 ms", "worst ms", "cpu µs", "exact"],
        groups,
    )
    return results
