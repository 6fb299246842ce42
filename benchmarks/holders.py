"""Semaphores and shared locks (issue 17): what a semaphore slot and a shared hold cost next to
the plain lock of the same strategy, measured the way ``uncontended`` and ``handoff`` measure it.

Uncontended: acquire+release of a plain lock (``try_lock()``), of a slot of
``CommandIsolation(name, max_holders=3)`` (``try_lock()``) and of a shared hold
(``lock(timeout=0, shared=True)``), batches of the three interleaved at random.

Handoff, between two processes alternating on one lock: a plain lock; the last free slot of a
semaphore of 2 whose other slot a third process holds throughout; a shared hold then an exclusive
waiter, and an exclusive hold then a shared waiter. Not on the memory strategy, which lives in one
process. A strategy without an ability refuses it with ``IsolationError``: its rows say
"refused".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from benchmarks import environment, handoff, placement, processes, uncontended
from benchmarks.candidates import Candidate, Lockable, app
from benchmarks.report import Group, Row, median, percentile, print_table, ratio
from django_isolatable import IsolationError
from django_isolatable.backends import load_backend_class

REFUSED = "refused"


@dataclass(frozen=True)
class Strategy:
    key: str
    title: str
    strategy: str
    #: Servers it needs (see ``environment.unavailable``).
    needs: tuple[str, ...] = ()
    isolatable: dict[str, str] = field(default_factory=dict)
    #: Whether two processes can share its locks (not the memory strategy's).
    across_processes: bool = True


@dataclass(frozen=True)
class Hold:
    label: str
    max_holders: int = 1
    shared: bool = False


def _database(alias: str, title: str) -> Strategy:
    return Strategy(
        f"database-{alias}",
        f"database strategy on {title}",
        "database",
        (alias,),
        {"DATABASE_ALIAS": alias},
    )


STRATEGIES = [
    Strategy("file", "file strategy", "file"),
    Strategy("memory", "memory strategy", "memory", across_processes=False),
    Strategy("redis", "redis strategy", "redis", ("redis",)),
    Strategy("cache", "cache strategy (Django RedisCache)", "cache", ("redis",)),
    Strategy("postgres", "postgres strategy", "postgres", ("postgres",)),
    _database("postgres", "PostgreSQL"),
    _database("mariadb", "MariaDB"),
    _database("sqlite", "SQLite"),
]

PLAIN = Hold("plain lock")
SLOT = Hold("semaphore slot (max_holders=3)", max_holders=3)
SHARED = Hold("shared hold", shared=True)
#: The handoff's semaphore: two slots, one held throughout by a third process.
LAST_SLOT = Hold("last free slot (max_holders=2, 1 held)", max_holders=2)
EXCLUSIVE_AFTER_SHARED = "shared hold -> exclusive waiter"
SHARED_AFTER_EXCLUSIVE = "exclusive hold -> shared waiter"
SHARED_WAYS = (EXCLUSIVE_AFTER_SHARED, SHARED_AFTER_EXCLUSIVE)
#: Handoff rows: (label, the holder's kind of hold, the waiter's).
HANDOFFS = [
    (PLAIN.label, PLAIN, PLAIN),
    (LAST_SLOT.label, LAST_SLOT, LAST_SLOT),
    (EXCLUSIVE_AFTER_SHARED, SHARED, PLAIN),
    (SHARED_AFTER_EXCLUSIVE, PLAIN, SHARED),
]


@dataclass
class Measured:
    """The section's figures, keyed "strategy key/row label"."""

    uncontended: dict[str, float] = field(default_factory=dict)  # median µs
    handoff: dict[str, list[float]] = field(default_factory=dict)  # ms per trial
    refused: set[str] = field(default_factory=set)


def _refused(attempt: Callable[[], object]) -> bool:
    """Whether the strategy refuses ``attempt``'s kind of hold (a plain ``IsolationError``;
    its subclasses, a lock not free or a failing server, are failures of the run)."""
    try:
        attempt()
    except IsolationError as e:
        if type(e) is not IsolationError:
            raise
        return True
    return False


def _operation(strategy: Strategy, hold: Hold, slug: str) -> uncontended.Operation:
    isolation = environment.isolation(
        slug, strategy.strategy, max_holders=hold.max_holders, **strategy.isolatable
    )
    return lambda: isolation.lock(timeout=0, shared=hold.shared).release()


def _unavailable(strategy: Strategy) -> str | None:
    return next(filter(None, map(environment.unavailable, strategy.needs)), None)


def _group(strategy: Strategy) -> Group:
    return Group(f"{strategy.title} (raw: its plain lock)")


def run_uncontended(batches: int, seconds: float, measured: Measured) -> None:
    """Measure and print every strategy's three kinds of hold."""
    groups = []
    with placement.servers_apart() as placed:
        for strategy in STRATEGIES:
            group = _group(strategy)
            groups.append(group)
            reason = _unavailable(strategy)
            if reason:
                group.skipped.append(reason)
                continue
            operations: dict[str, uncontended.Operation] = {}
            for number, hold in enumerate((PLAIN, SLOT, SHARED)):
                operation = _operation(strategy, hold, f"holders-{strategy.key}-{number}")
                if _refused(operation):
                    measured.refused.add(f"{strategy.key}/{hold.label}")
                else:
                    operations[hold.label] = operation
            samples = uncontended.measure(operations, batches, seconds)
            base = median(samples[PLAIN.label])
            for hold in (PLAIN, SLOT, SHARED):
                values = samples.get(hold.label)
                if values is None:
                    group.rows.append(Row(hold.label, [REFUSED, ""]))
                    continue
                measured.uncontended[f"{strategy.key}/{hold.label}"] = median(values)
                cells = [f"{median(values):.1f}", f"{percentile(values, 0.9):.1f}"]
                group.rows.append(Row(hold.label, cells, ratio(median(values), base)))
    print_table(
        f"Semaphores and shared locks, uncontended acquire + release, µs per operation "
        f"({batches} batches of ~{seconds * 1000:g} ms; {placed})",
        ["median", "p90"],
        groups,
    )


def _opener(strategy: Strategy, hold: Hold) -> Callable[[str], Lockable]:
    """How a process opens ``hold``'s lock of ``strategy``, to ``acquire`` it blocking."""
    return app(
        strategy.strategy,
        max_holders=hold.max_holders,
        shared=hold.shared,
        **strategy.isolatable,
    )


def _keep(connection: Connection, open_lock: Callable[[str], Lockable], slug: str) -> None:
    """Hold the lock from the first message until the next."""
    lock = open_lock(slug)
    lock.acquire()
    connection.send("holding")
    connection.recv()
    lock.release()
    lock.close()


@contextlib.contextmanager
def _slot_kept(strategy: Strategy, hold: Hold, slug: str) -> Iterator[None]:
    """One slot of ``hold``'s semaphore held by another process throughout."""
    if hold.max_holders == 1:
        yield
        return
    with processes.workers(_keep, 1, _opener(strategy, hold), slug) as (keeper,):
        processes.receive(keeper)
        yield
        keeper.send(False)


def _handoff_row(
    strategy: Strategy, label: str, holder: Hold, waiter: Hold, slug: str, span: float, trials: int
) -> list[float]:
    """Latencies (ms) of one handoff row."""
    candidate = Candidate(label, _opener(strategy, holder), 0, strategy.needs)
    with _slot_kept(strategy, holder, slug):
        return handoff.measure(candidate, slug, trials, span, _opener(strategy, waiter))


def run_handoff(trials: int, longest_span: float, measured: Measured) -> None:
    """Measure every strategy's handoff rows (holds spread as ``handoff`` spreads them)."""
    groups = []
    for strategy in STRATEGIES:
        if not strategy.across_processes:
            continue
        group = _group(strategy)
        groups.append(group)
        reason = _unavailable(strategy)
        if reason:
            group.skipped.append(reason)
            continue
        poll = load_backend_class(strategy.strategy).poll_interval
        span = min(max(poll, handoff.HOLD_AT_LEAST), longest_span)
        slug = f"holders-handoff-{strategy.key}"
        refused = {
            hold
            for number, hold in enumerate((LAST_SLOT, SHARED))
            if _refused(_operation(strategy, hold, f"{slug}-probe-{number}"))
        }
        base: float | None = None
        for number, (label, holder, waiter) in enumerate(HANDOFFS):
            key = f"{strategy.key}/{label}"
            if {holder, waiter} & refused:
                measured.refused.add(key)
                group.rows.append(Row(label, [REFUSED, "", ""]))
                continue
            latencies = _handoff_row(
                strategy, label, holder, waiter, f"{slug}-{number}", span, trials
            )
            measured.handoff[key] = latencies
            value = median(latencies)
            base = value if base is None else base
            cells = [f"{value:.2f}", f"{percentile(latencies, 0.9):.2f}", f"{max(latencies):.2f}"]
            group.rows.append(Row(label, cells, ratio(value, base)))
    print_table(
        f"Semaphores and shared locks, handoff latency, ms from release() to the waiter holding "
        f"the lock ({trials} trials, holds of {handoff.HOLD_AT_LEAST * 1000:g} ms + up to "
        f"{longest_span * 1000:g} ms)",
        ["median", "p90", "max"],
        groups,
    )


def run(batches: int, seconds: float, trials: int, longest_span: float) -> Measured:
    """Measure and print both tables."""
    measured = Measured()
    run_uncontended(batches, seconds, measured)
    run_handoff(trials, longest_span, measured)
    return measured
