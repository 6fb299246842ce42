"""``django_isolatable.testing``: a project's tests never meet the locks of a run beside them.

Each test starts a real process that holds the file-strategy lock ``isolated_echo`` (what a
development run of the command would hold), checks that ``call_command("isolated_echo")`` is
refused because of it, and then that inside ``isolated_locks()`` (as a context manager, as a
decorator of functions and test classes, and as the pytest fixture) the same call succeeds,
locks use the memory strategy in a namespace of their own, waits end, and that the settings
are as before afterwards.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import unittest
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.test import SimpleTestCase

from django_isolatable import AlreadyRunning, CommandIsolation, LockTimeout
from django_isolatable.conf import isolatable_settings
from django_isolatable.testing import TEST_TIMEOUT, IsolatedLocks, isolated_locks
from tests.processes import Worker


def echo() -> str:
    """Run the isolated command the way a test of a project would; its output."""
    out = io.StringIO()
    call_command("isolated_echo", stdout=out)
    return out.getvalue()


@pytest.fixture
def held_elsewhere(settings: Any, lock_dir: Path, tmp_path: Path) -> Iterator[Worker]:
    """Another process holds the real (file strategy) lock ``isolated_echo``, as a development
    run of the command would; the test's settings use that same lock store."""
    isolatable = {"STRATEGY": "file", "LOCK_DIR": str(lock_dir), "SKIPPED_EXIT_CODE": 3}
    settings.ISOLATABLE = isolatable
    holder = Worker(
        tmp_path / "holder.stderr",
        "hold",
        "isolated_echo",
        str(lock_dir),
        env={"ISOLATABLE_TEST_SETTINGS": json.dumps(isolatable)},
    )
    try:
        holder.expect("held")
        with pytest.raises(AlreadyRunning) as refused:  # what a test meets without the helper
            echo()
        assert refused.value.holder is not None
        assert refused.value.holder.pid == holder.pid
        yield holder
        holder.finish()
    finally:
        holder.close()


@pytest.fixture
def settings_restored() -> Iterator[None]:
    """Checks, once the test and the fixtures after this one are done, that
    ``settings.ISOLATABLE`` is what it was before them."""
    before = copy.deepcopy(django_settings.ISOLATABLE)
    yield
    assert django_settings.ISOLATABLE == before
    assert isolatable_settings.STRATEGY == before.get("STRATEGY", "file")


def assert_isolated(locks: IsolatedLocks) -> None:
    """Inside ``isolated_locks()``: the command runs, and locks are memory locks of ``locks``."""
    assert echo() == "echo None\n"
    assert locks.key_prefix.startswith("isolated-locks-")
    assert isolatable_settings.KEY_PREFIX == locks.key_prefix
    assert isolatable_settings.SKIPPED_EXIT_CODE == 3  # the project's other keys stay
    with CommandIsolation("isolated_echo").lock() as guard:
        assert guard.info.strategy == "memory"
        assert [info.name for info in locks.held()] == ["isolated_echo"]
        assert locks.is_locked("isolated_echo")
        with pytest.raises(AlreadyRunning):  # the command still meets the test's own lock
            echo()
    assert locks.held() == []


def test_as_a_context_manager(held_elsewhere: Worker, settings_restored: None) -> None:
    with isolated_locks() as locks:
        assert_isolated(locks)
    with pytest.raises(AlreadyRunning):
        echo()


def test_as_a_function_decorator(held_elsewhere: Worker, settings_restored: None) -> None:
    @isolated_locks()
    def a_test() -> str:
        assert_isolated(IsolatedLocks(isolatable_settings.KEY_PREFIX))
        return isolatable_settings.KEY_PREFIX

    first, second = a_test(), a_test()
    assert first != second  # each call, a namespace of its own
    with pytest.raises(AlreadyRunning):
        echo()


def test_as_a_decorator_of_a_coroutine_function(
    held_elsewhere: Worker, settings_restored: None
) -> None:
    @isolated_locks()
    async def a_test() -> None:
        assert_isolated(IsolatedLocks(isolatable_settings.KEY_PREFIX))

    asyncio.run(a_test())


@pytest.mark.parametrize("base", [unittest.TestCase, SimpleTestCase])
def test_as_a_test_class_decorator(
    base: type[unittest.TestCase], held_elsewhere: Worker, settings_restored: None
) -> None:
    prefixes = []

    @isolated_locks()
    class Tests(base):
        def test_one(self) -> None:
            assert_isolated(IsolatedLocks(isolatable_settings.KEY_PREFIX))
            prefixes.append(isolatable_settings.KEY_PREFIX)

        def test_two(self) -> None:
            self.test_one()

    result = unittest.TestResult()
    unittest.defaultTestLoader.loadTestsFromTestCase(Tests).run(result)
    assert result.wasSuccessful(), result.errors + result.failures
    assert result.testsRun == 2
    assert len(set(prefixes)) == 2  # each test, a namespace of its own
    with pytest.raises(AlreadyRunning):
        echo()


def test_the_pytest_fixture(  # tests/conftest.py registers the plugin, as a project may
    held_elsewhere: Worker, settings_restored: None, isolatable_locks: IsolatedLocks
) -> None:
    assert_isolated(isolatable_locks)


def test_each_block_is_a_fresh_namespace(settings_restored: None) -> None:
    with isolated_locks() as first:
        left_held = CommandIsolation("report").lock()
    with isolated_locks() as second:
        assert second.key_prefix != first.key_prefix
        CommandIsolation("report").try_lock().release()
        with isolated_locks() as inner:
            assert isolatable_settings.KEY_PREFIX == inner.key_prefix
        assert isolatable_settings.KEY_PREFIX == second.key_prefix
    assert first.is_locked("report")
    left_held.release()


def test_a_lock_never_waits_forever(settings_restored: None) -> None:
    with isolated_locks():
        assert CommandIsolation("report").timeout == TEST_TIMEOUT
    with isolated_locks(timeout=0.2), CommandIsolation("report").lock():
        with pytest.raises(LockTimeout) as timed_out:
            CommandIsolation("report").lock()
        assert timed_out.value.timeout == 0.2


def test_a_lock_made_before_the_block_uses_the_memory_strategy_inside_it(settings, tmp_path):
    """A module-level ``CommandIsolation`` used before the block builds its backend again when
    ``ISOLATABLE`` changes: inside, it locks in memory, not in the real store."""
    settings.ISOLATABLE = {"STRATEGY": "file", "LOCK_DIR": str(tmp_path)}
    early = CommandIsolation("made-early")
    early.try_lock().release()
    assert early.backend.strategy == "file"
    with isolated_locks(), early.try_lock() as guard:
        assert early.backend.strategy == "memory"
        assert guard.info.strategy == "memory"
    assert early.backend.strategy == "file"
