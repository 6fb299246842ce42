"""MAX_AGE: a run skipped because of a holder older than its maximum age is an alert (an error
logged, ``lock_overdue`` sent, exit status OVERDUE_EXIT_CODE), and the holder keeps its lock."""

from __future__ import annotations

import time

import pytest
from django.core.management import call_command

from django_isolatable import AlreadyRunning, CommandIsolation, isolated
from django_isolatable.holders import utcnow
from django_isolatable.signals import lock_overdue, lock_skipped
from tests import test_command_processes
from tests.test_command_processes import isolation, wait_for_holder

manage = test_command_processes.manage  # the fixture: real manage.py processes

MAX_AGE = 4.0  # seconds: a loaded machine starts a manage.py process well within it


def test_a_run_skipped_behind_an_overdue_holder_exits_with_the_overdue_status(manage, lock_dir):
    first = manage("import_data", "--seconds", "30")
    holder = wait_for_holder(first, "import_data", lock_dir)
    env = {"ISOLATABLE_MAX_AGE": str(MAX_AGE)}

    young = manage("import_data", "--seconds", "0", env=env)
    assert young.finish() == 0, young.stderr  # held for less than MAX_AGE: a normal skip
    assert "skipped" in young.stderr
    assert "maximum age" not in young.stderr

    # Past MAX_AGE by the holder's own start time, however long the young run took.
    time.sleep(max(0.0, MAX_AGE + 0.5 - (utcnow() - holder.acquired_at).total_seconds()))
    overdue = manage("import_data", "--seconds", "0", env=env)
    assert overdue.finish() == 2, overdue.stderr
    assert "longer than its maximum age" in overdue.stderr
    assert f"pid {first.pid}" in overdue.stderr
    assert overdue.stdout == ""  # handle() never ran

    custom = manage(
        "import_data", "--seconds", "0", env={**env, "ISOLATABLE_OVERDUE_EXIT_CODE": "9"}
    )
    assert custom.finish() == 9, custom.stderr

    # The overdue holder keeps its lock: it is alive, so nothing takes it.
    assert first.running
    assert isolation("import_data", lock_dir).holder().token == holder.token


def test_lock_overdue_is_sent_on_the_api_and_decorator_paths(settings, lock_dir):
    settings.ISOLATABLE = {**settings.ISOLATABLE, "MAX_AGE": 0.2}
    sent: list[tuple[str, str, float]] = []
    skipped: list[str] = []

    def overdue(sender, name, holder, age, **kwargs):
        sent.append((name, holder.token, age))
        raise RuntimeError("a receiver's error never changes the lock")

    def skip(sender, name, holder, **kwargs):
        skipped.append(name)

    lock_overdue.connect(overdue)
    lock_skipped.connect(skip)
    try:
        with CommandIsolation("report").lock() as guard:
            with pytest.raises(AlreadyRunning) as young:
                CommandIsolation("report").try_lock()
            assert young.value.overdue_age is None
            assert sent == []
            time.sleep(0.4)
            with pytest.raises(AlreadyRunning) as old:
                CommandIsolation("report").try_lock()
            assert old.value.overdue_age > 0.2
            assert sent[-1][:2] == ("report", guard.info.token)
            assert CommandIsolation("report", max_age=None).try_lock  # per lock: no limit
            with pytest.raises(AlreadyRunning) as unlimited:
                CommandIsolation("report", max_age=None).try_lock()
            assert unlimited.value.overdue_age is None
            assert len(sent) == 1

            @isolated("report")
            def report() -> str:
                return "ran"

            assert report() is None
            assert len(sent) == 2
            assert not guard.lost
        assert skipped == ["report"] * 4
    finally:
        lock_overdue.disconnect(overdue)
        lock_skipped.disconnect(skip)


def test_call_command_raises_with_the_overdue_age(settings, lock_dir):
    settings.ISOLATABLE = {**settings.ISOLATABLE, "MAX_AGE": 0.2}
    with CommandIsolation("isolated_echo").lock():
        time.sleep(0.4)
        with pytest.raises(AlreadyRunning) as raised:
            call_command("isolated_echo")
    assert raised.value.overdue_age > 0.2


@pytest.mark.parametrize("value", [0, -1, "1h", True])
def test_a_bad_max_age_is_refused(value):
    with pytest.raises(ValueError, match="max_age"):
        CommandIsolation("x", max_age=value)
