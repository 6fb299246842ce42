"""The ``isolated`` decorator's overhead: a decorated no-op against the same no-op called
inside ``with isolation.try_lock():``, on the file and memory strategies (the cheapest locks,
where any overhead shows most), and a templated name (``"...:{key}"``), whose arguments are
bound to the signature on every call.

Each group's first row, the direct ``try_lock()``, is the base of the ``x raw`` column. Batches
of the rows are interleaved in random order and run on one CPU, as in the uncontended section.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from benchmarks import environment, placement
from benchmarks.report import Group, print_table
from benchmarks.uncontended import Operation, Subject, _run_group
from django_isolatable import CommandIsolation, isolated

STRATEGIES = (("file", "File strategy"), ("memory", "Memory strategy"))


def work(key: str = "a") -> None:
    """The isolated work: nothing, so that only the locking is measured."""


def direct(strategy: str) -> Callable[[contextlib.ExitStack], Operation]:
    def make(stack: contextlib.ExitStack) -> Operation:
        isolation = CommandIsolation(environment.lock_name(f"direct-{strategy}"), strategy=strategy)

        def operation() -> None:
            with isolation.try_lock():
                work()

        return operation

    return make


def decorated(strategy: str, template: str = "") -> Callable[[contextlib.ExitStack], Operation]:
    def make(stack: contextlib.ExitStack) -> Operation:
        name = environment.lock_name(f"decorated-{strategy}{'-templated' if template else ''}")
        function = isolated(name + template, strategy=strategy)(work)
        if template:
            return lambda: function(key="a")
        return function

    return make


def _subjects(strategy: str) -> list[Subject]:
    return [
        Subject("direct try_lock() + release", direct(strategy)),
        Subject("@isolated(name)", decorated(strategy)),
        Subject("@isolated(name + ':{key}'), bound per call", decorated(strategy, ":{key}")),
    ]


def run(batches: int, seconds: float) -> dict[str, float]:
    """Measure and print both groups; return each row's median (µs) by "strategy/label"."""
    medians: dict[str, float] = {}
    with placement.servers_apart() as placed:  # one CPU, as the uncontended section
        groups: list[Group] = [
            _run_group(strategy, title, _subjects(strategy), batches, seconds, medians)
            for strategy, title in STRATEGIES
        ]
    print_table(
        f"Decorator overhead: a no-op called isolated, µs per call "
        f"({batches} batches of ~{seconds * 1000:g} ms; {placed})",
        ["median", "p90"],
        groups,
    )
    return medians
