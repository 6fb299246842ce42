"""The engine's side of semaphores and shared holds: arguments, refusals and messages. What
each strategy does is tests/conformance_holders.py's; processes are in tests/stress.py."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command

from django_isolatable import AlreadyRunning, CommandIsolation, IsolationError, isolated
from django_isolatable.holders import LockInfo
from tests.test_once_per import BackendWithoutPeriods

PLAIN_ONLY = f"{__name__}.PlainOnlyBackend"


class PlainOnlyBackend(BackendWithoutPeriods):
    """A strategy from a dotted path with neither the semaphore nor the shared ability."""

    strategy = "plain-only"


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", True, None, 10_001])
def test_a_bad_max_holders_is_a_value_error(bad):
    with pytest.raises(ValueError, match="max_holders must be a whole number from 1 to 10000"):
        CommandIsolation("job", max_holders=bad)
    with pytest.raises(ValueError, match="max_holders"):
        isolated("job", max_holders=bad)


def test_shared_must_be_a_bool_and_combines_with_neither_max_holders_nor_once_per():
    with pytest.raises(ValueError, match="shared must be True or False"):
        CommandIsolation("job", strategy="memory").lock(shared="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shared=True cannot be combined with once_per"):
        CommandIsolation("job", strategy="memory", once_per=60).try_lock(shared=True)
    with pytest.raises(ValueError, match="once_per cannot be combined with max_holders"):
        CommandIsolation("job", once_per=60, max_holders=2)
    assert not CommandIsolation("job", strategy="memory").is_locked()


def test_a_strategy_without_the_abilities_refuses_them_at_the_call():
    isolation = CommandIsolation("job", strategy=PLAIN_ONLY)
    with pytest.raises(IsolationError) as raised:
        isolation.lock(shared=True)
    assert str(raised.value).startswith("The plain-only strategy cannot hold lock 'job' shared")
    with pytest.raises(IsolationError) as raised:
        CommandIsolation("job", strategy=PLAIN_ONLY, max_holders=3).try_lock()
    assert str(raised.value) == (
        "The plain-only strategy cannot hold lock 'job' with max_holders=3."
    )
    assert not isolation.is_locked()
    with isolation.try_lock():  # the plain lock still works
        assert isolation.is_locked()


def test_copies_keep_max_holders_and_repr_shows_it():
    isolation = CommandIsolation("job", max_holders=4)
    assert isolation.with_timeout(3).max_holders == 4
    assert isolation.with_strategy("memory").max_holders == 4
    assert "max_holders=4" in repr(isolation)
    assert "max_holders" not in repr(CommandIsolation("job"))


def test_messages_of_a_full_semaphore_and_a_shared_hold():
    semaphore = CommandIsolation("resize", strategy="memory", max_holders=2)
    with semaphore.try_lock(), semaphore.try_lock(), pytest.raises(AlreadyRunning) as raised:
        semaphore.try_lock()
    assert str(raised.value).startswith(
        "resize is already running 2 times at once, its limit (one is pid "
    )
    reader = CommandIsolation("schema", strategy="memory")
    with reader.try_lock(shared=True), pytest.raises(AlreadyRunning) as raised:
        reader.try_lock()
    assert str(raised.value).startswith("schema is held shared (pid ")


def test_records_keep_mode_and_max_holders_through_json():
    isolation = CommandIsolation("job", strategy="memory", max_holders=3)
    with isolation.try_lock() as guard:
        record = guard.info
        assert (record.mode, record.max_holders) == ("semaphore", 3)
        again = LockInfo.from_json("job", "memory", record.to_json())
        assert again is not None
        assert (again.mode, again.max_holders) == ("semaphore", 3)
    for bad in ('{"mode": "owner", "max_holders": 0}', '{"mode": 3, "max_holders": "2"}'):
        read = LockInfo.from_json("job", "memory", bad)
        assert read is not None
        assert (read.mode, read.max_holders) == ("exclusive", 1)


def test_locks_status_table_has_a_mode_column_for_semaphores_and_shared_holds():
    semaphore = CommandIsolation("resize", strategy="memory", max_holders=2)
    reader = CommandIsolation("schema", strategy="memory")
    with semaphore.try_lock(), semaphore.try_lock(), reader.try_lock(shared=True):
        stdout = io.StringIO()
        call_command("locks", "--strategy", "memory", "status", "resize", "schema", stdout=stdout)
        header, *rows = stdout.getvalue().splitlines()
        assert header.split()[-2:] == ["MODE", "COMMAND"]
        assert [row.split()[0] for row in rows] == ["resize", "resize", "schema"]
        assert sum("semaphore of 2" in row for row in rows) == 2
        assert sum("  shared  " in row for row in rows) == 1
        stdout = io.StringIO()
        call_command("locks", "--strategy", "memory", "status", "--json", stdout=stdout)
        modes = sorted(row["mode"] for row in json.loads(stdout.getvalue()))
        assert modes == ["semaphore", "semaphore", "shared"]
