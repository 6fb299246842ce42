"""The ``isolated`` decorator's overhead: a decorated no-op against the same no-op called
inside ``with isolation.try_lock():``, on the file and memory strategies (the cheapest locks,
where any overhead shows most), and a templated name (``"...:{key}"``), whose arguments are
bound to the signature on every call.

Each group's first row, the direct ``try_lock()``, is the base of the ``x raw`` column. Batches
of the rows are interleaved in random order, on one CPU as in the uncontended section, and timed
in CPU time (``time.process_time``): nothing here waits for a server, so the time other
processes of a busy machine take from this one does not count.
"""

from __future__ import annotations

import time

from benchmarks import environment, placement, uncontended
from benchmarks.report import Group, Row, median, percentile, print_table, ratio
from benchmarks.uncontended import Operation
from django_isolatable import CommandIsolation, isolated

STRATEGIES = (("file", "File strategy"), ("memory", "Memory strategy"))
DIRECT = "direct try_lock() + release"
DECORATED = "@isolated(name)"
TEMPLATED = "@isolated(name + ':{key}'), bound per call"


def work(key: str = "a") -> None:
    """The isolated work: nothing, so that only the locking is measured."""


def _operations(strategy: str) -> dict[str, Operation]:
    isolation = CommandIsolation(environment.lock_name(f"direct-{strategy}"), strategy=strategy)

    def direct() -> None:
        with isolation.try_lock():
            work()

    decorated = isolated(environment.lock_name(f"decorated-{strategy}"), strategy=strategy)(work)
    templated = isolated(
        environment.lock_name(f"templated-{strategy}") + ":{key}", strategy=strategy
    )(work)
    return {DIRECT: direct, DECORATED: decorated, TEMPLATED: lambda: templated(key="a")}


def run(batches: int, seconds: float) -> dict[str, float]:
    """Measure and print both groups; return each row's median (µs) by "strategy/label"."""
    medians: dict[str, float] = {}
    groups = []
    with placement.servers_apart() as placed:  # one CPU, as the uncontended section
        for strategy, title in STRATEGIES:
            samples = uncontended.measure(
                _operations(strategy), batches, seconds, clock=time.process_time
            )
            group = Group(title)
            for label, values in samples.items():
                medians[f"{strategy}/{label}"] = median(values)
                cells = [f"{median(values):.1f}", f"{percentile(values, 0.9):.1f}"]
                base = medians[f"{strategy}/{DIRECT}"]
                group.rows.append(Row(label, cells, ratio(median(values), base)))
            groups.append(group)
    print_table(
        f"Decorator overhead: a no-op called isolated, CPU µs per call "
        f"({batches} batches of ~{seconds * 1000:g} ms; {placed})",
        ["median", "p90"],
        groups,
    )
    return medians
