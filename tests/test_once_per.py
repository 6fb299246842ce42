"""Once per period (``once_per``) between real processes, and its bad values.

A fleet's cron: processes started together in one period run the job once, whichever strategy
keeps the record. Hosts whose clocks differ: a process whose wall clock is a minute off
(``ISOLATABLE_TEST_CLOCK_OFFSET``, see tests/workers.py) still sees the period the others see
where the store's clock counts periods (redis, postgres, database on a server), and sees its
own where this host's clock does (file): the second proves the fake clock works. What
the period tests in every strategy's conformance suite cover is in tests/conformance_periods.py.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from django_isolatable import AlreadyRan, CommandIsolation, IsolationError, LockInfo, isolated
from django_isolatable.backends import Backend, Lease
from tests import services, strategies
from tests.conformance_periods import wait_for_a_fresh_period
from tests.processes import Worker, Workers
from tests.strategies import StrategyConfig
from tests.testapp.management.commands import isolated_echo

HOUR = 3600.0
MINUTE = 60.0


#: The strategies that count periods on their store's clock (the others: this host's).
STORE_CLOCKS = ("redis", "postgres", "database")


@dataclass(frozen=True)
class Store:
    """A strategy as these tests configure it (tests/strategies.py's), and its clock."""

    config: StrategyConfig

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def settings(self) -> dict[str, Any]:
        return {"STRATEGY": self.config.strategy, **self.config.isolatable_settings}

    @property
    def service(self) -> str | None:
        return self.config.service

    @property
    def store_clock(self) -> bool:
        """Periods are counted on the store's clock, not this host's. (SQLite's clock is this
        host's all the same, but it is what the database strategy counts periods on.)"""
        return self.config.strategy in STORE_CLOCKS


FILE, REDIS, POSTGRES = Store(strategies.FILE), Store(strategies.REDIS), Store(strategies.POSTGRES)
DATABASE_POSTGRES = Store(strategies.DATABASE_ON_POSTGRES)
DATABASE_MARIADB = Store(strategies.DATABASE_ON_MARIADB)
DATABASE_SQLITE = Store(strategies.DATABASE_ON_SQLITE)


def params(*stores: Store) -> list[Any]:
    return [pytest.param(store, id=store.id) for store in stores]


@pytest.fixture
def store(request, settings, django_db_blocker) -> Iterator[Store]:
    """This test's strategy (``request.param``), in this process's settings too."""
    chosen: Store = request.param
    if chosen.service is not None:
        services.require(chosen.service)
    settings.ISOLATABLE = {**settings.ISOLATABLE, **chosen.settings}
    with django_db_blocker.unblock():  # the database strategies use connections of their own
        yield chosen


@pytest.fixture
def name(request) -> str:
    return f"once:{request.node.name}:{os.getpid()}:{time.monotonic_ns()}"


@pytest.fixture
def spawn(
    store: Store, name: str, tmp_path: Path, lock_dir: Path
) -> Iterator[Callable[..., Worker]]:
    """``spawn(once_per, clock_offset=0)`` starts a ``once`` worker on ``name`` whose journal
    is ``tmp_path / "journal"`` (await its ``ready``); workers still running at the end are
    killed."""
    workers = Workers(tmp_path, name, lock_dir)

    def start(once_per: float, clock_offset: float = 0.0) -> Worker:
        env = {"ISOLATABLE_TEST_SETTINGS": json.dumps(store.settings)}
        if clock_offset:
            env["ISOLATABLE_TEST_CLOCK_OFFSET"] = str(clock_offset)
        journal = str(tmp_path / "journal")
        options = ("--once-per", str(once_per), "--journal", journal)
        return workers.start("once", *options, env=env)

    yield start
    workers.close()


def journal(tmp_path: Path) -> list[int]:
    path = tmp_path / "journal"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize(
    "store",
    params(FILE, REDIS, POSTGRES, DATABASE_SQLITE, DATABASE_POSTGRES, DATABASE_MARIADB),
    indirect=True,
)
def test_three_processes_started_together_in_one_period_run_the_job_once(
    store, spawn, name, tmp_path
):
    """Cron fires on three servers at once, periods of a minute: each waits for the lock in
    turn, the first runs the job, the ones after it find the period's run recorded and skip.
    The third server's clock is a minute ahead, so by its own clock it is always in the next
    period: where the store's clock counts periods it is skipped all the same (one run);
    where this host's clock does (file), it runs in what it takes for its own period (two
    runs), which also shows that its clock is off."""
    workers = [spawn(MINUTE), spawn(MINUTE), spawn(MINUTE, clock_offset=MINUTE)]
    for worker in workers:
        worker.expect("ready")
    backend = CommandIsolation(name).backend
    wait_for_a_fresh_period(backend, MINUTE, needed=8)  # all three runs fall in one period
    period = math.floor(backend.store_time() / MINUTE)
    for worker in workers:
        worker.send("go")
    events = [worker.event() for worker in workers]
    for worker in workers:
        assert worker.process.wait(30) == 0
    ran = [worker.pid for worker, event in zip(workers, events, strict=True) if event[0] == "ran"]
    skipped = [event[1:] for event in events if event[0] == "skipped"]
    if store.store_clock:
        assert len(ran) == 1, events
        assert skipped == [[str(period), str(ran[0])]] * 2, events
    else:
        assert len(ran) == 2, events
        assert workers[2].pid in ran, events  # the one a minute ahead: its own period
        assert skipped == [[str(period), str(ran[0] if ran[0] != workers[2].pid else ran[1])]]
    assert sorted(journal(tmp_path)) == sorted(ran)


# --- IsolatableCommand through call_command -----------------------------------------------


def test_isolation_once_per_skips_a_second_run_and_a_failed_run_leaves_the_period_open(tmp_path):
    marker = tmp_path / "marker"
    name = f"once-echo-{time.monotonic_ns()}"

    class Command(isolated_echo.Command):
        isolation_name = name
        isolation_once_per = HOUR

    with pytest.raises(TypeError):  # handle() fails: time.sleep("not a number")
        call_command(Command(), marker=str(marker), seconds="not a number")
    call_command(Command(), marker=str(marker), stdout=io.StringIO())
    with pytest.raises(AlreadyRan) as raised:
        call_command(Command(), marker=str(marker))
    assert raised.value.command == name
    assert raised.value.holder is not None
    assert raised.value.holder.pid == os.getpid()
    assert marker.read_text() == "ran\nran\n"  # the failed run and the successful one
    # --once-per of another length: another period, so it runs
    call_command(Command(), "--once-per", "7200", marker=str(marker), stdout=io.StringIO())
    assert marker.read_text() == "ran\nran\nran\n"


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan", "inf"])
def test_a_bad_once_per_option_is_a_command_error(value):
    expected = f"argument --once-per: expected seconds > 0, got '{value}'"
    with pytest.raises(CommandError, match=expected):
        call_command("isolated_echo", "--once-per", value)


# --- bad values at construction and decoration ------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, -0.5, "3600", True, math.nan, math.inf, [3600]])
def test_a_bad_once_per_is_a_value_error_at_construction_and_decoration(value):
    message = f"once_per must be None or a number of seconds > 0, not {value!r}."
    with pytest.raises(ValueError, match="once_per must be") as raised:
        CommandIsolation("job", once_per=value)
    assert str(raised.value) == message
    with pytest.raises(ValueError, match="once_per must be") as raised:
        isolated("job", once_per=value)
    assert str(raised.value) == message


def test_once_per_is_kept_by_fluent_copies():
    isolation = CommandIsolation("job", once_per=90)
    assert isolation.once_per == 90.0
    assert isolation.with_timeout(5).once_per == 90.0
    assert isolation.with_strategy("memory").once_per == 90.0


class BackendWithoutPeriods(Backend):
    """A strategy from a dotted path that has no periods ability: one lock at a time."""

    strategy = "without-periods"
    held: ClassVar[dict[str, Lease]] = {}

    def acquire(self, name: str, info: LockInfo) -> Lease | None:
        if name in self.held:
            return None
        self.held[name] = Lease(name, info.token or "", info)
        return self.held[name]

    def release(self, lease: Lease) -> bool:
        return self.held.pop(lease.name, None) is not None

    def inspect(self, name: str) -> list[LockInfo]:
        lease = self.held.get(name)
        return [] if lease is None else [lease.info]


def test_once_per_on_a_strategy_without_the_periods_ability_is_refused_at_the_lock_call():
    isolation = CommandIsolation("job", strategy=f"{__name__}.BackendWithoutPeriods", once_per=60)
    with pytest.raises(IsolationError) as raised:
        isolation.lock()
    assert str(raised.value) == (
        "The without-periods strategy cannot record runs per period, so job cannot use "
        "once_per; use a strategy that can (all built-in ones do)."
    )
    assert not isolation.is_locked()  # the lock it took was released
