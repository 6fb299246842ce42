"""The conformance suite: the same contract tests, run against every strategy.

A strategy's test class inherits ``LockConformance`` and sets ``strategy``; a class whose
strategy needs a server adds a fixture that skips (or fails, with ISOLATABLE_REQUIRE_SERVICES=1)
when the server is unreachable.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import os
import threading
import time
from datetime import timezone
from typing import ClassVar

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from django_isolatable import (
    AlreadyRunning,
    CommandIsolation,
    LockGuard,
    LockInfo,
    LockTimeout,
)
from django_isolatable.isolation import ASYNC_SLICE
from tests import services
from tests.conformance_fencing import FencingConformance
from tests.conformance_holders import HolderConformance
from tests.conformance_periods import PeriodConformance

TRICKY_NAMES = [
    "migrate",
    "cache:clear",
    "import/customers",
    "../../etc/passwd",
    "..",
    ".",
    ".hidden",
    "%2E",
    "a b\tc\nd",
    "ünïcødé-名前-🔒",
    "x" * 300,
    "ü" * 300,
    "MiXeD",
    "~tilde",
    "a%41",
    "aA",
    "index",  # the cache strategy's index entry once had this key
]


class LockConformance(PeriodConformance, HolderConformance, FencingConformance):
    """Contract tests every strategy passes. ``make(name, **kwargs)`` builds a CommandIsolation.
    The periods ability's tests (``once_per``) are ``PeriodConformance``'s."""

    strategy: str
    #: The server this strategy needs (see tests/services.py), if any.
    service: str | None = None
    #: ISOLATABLE settings this strategy's tests run with.
    isolatable_settings: ClassVar[dict[str, object]] = {}

    @pytest.fixture(autouse=True)
    def _strategy_settings(self, settings, django_db_blocker):
        if self.service is not None:
            services.require(self.service)
        settings.ISOLATABLE = {**settings.ISOLATABLE, **self.isolatable_settings}
        # The database strategies use connections of their own, not pytest-django's test ones.
        with django_db_blocker.unblock():
            yield

    @pytest.fixture
    def make(self):
        def make(name: str, **kwargs: object) -> CommandIsolation:
            return CommandIsolation(name, strategy=self.strategy, **kwargs)  # type: ignore[arg-type]

        return make

    @pytest.fixture
    def name(self, request) -> str:
        # Unique per test, so shared servers never see two tests' locks collide.
        return f"conformance:{request.node.name}:{os.getpid()}:{time.monotonic_ns()}"

    def test_lock_records_the_holder(self, make, name):
        isolation = make(name)
        with isolation.lock() as guard:
            assert isinstance(guard, LockGuard)
            holder = isolation.holder()
            assert isinstance(holder, LockInfo)
            assert holder.name == name
            assert holder.strategy == self.strategy
            assert holder.pid == os.getpid()
            assert holder.token == guard.info.token
            assert holder.token
            assert holder.alive is True
            assert holder.acquired_at is not None
            assert holder.acquired_at.tzinfo == timezone.utc
            assert holder.process_started_at is not None
            assert holder.hostname
            assert holder.host_id
            assert isolation.is_locked()
        assert not isolation.is_locked()
        assert isolation.holder() is None

    def test_try_lock_when_held_raises_already_running_at_once(self, make, name):
        with make(name).lock():
            started = time.monotonic()
            with pytest.raises(AlreadyRunning) as raised:
                make(name).try_lock()
            assert time.monotonic() - started < 2
        error = raised.value
        assert type(error) is AlreadyRunning
        assert error.command == name
        assert error.holder is not None
        assert error.holder.pid == os.getpid()
        assert error.locked_at == error.holder.acquired_at
        assert f"{name} is already running (pid {os.getpid()} on " in str(error)

    def test_lock_with_timeout_raises_lock_timeout_after_about_that_long(self, make, name):
        with make(name).lock():
            started = time.monotonic()
            with pytest.raises(LockTimeout) as raised:
                make(name).lock_with_timeout(0.3)
            waited = time.monotonic() - started
        assert 0.29 <= waited < 5
        assert raised.value.timeout == 0.3
        assert raised.value.command == name
        assert isinstance(raised.value, AlreadyRunning)

    def test_zero_timeout_is_try_lock(self, make, name):
        with make(name).lock(), pytest.raises(AlreadyRunning) as raised:
            make(name).lock(timeout=0)
        assert type(raised.value) is AlreadyRunning

    def test_waiter_gets_the_lock_when_the_holder_releases(self, make, name):
        guard = make(name).lock()
        waiting = threading.Event()
        result: list[LockGuard] = []

        def wait_forever() -> None:
            waiting.set()
            result.append(make(name).lock(timeout=None))

        thread = threading.Thread(target=wait_forever)
        thread.start()
        waiting.wait(5)
        time.sleep(0.05)
        assert not result, "the waiter got in while the lock was held"
        guard.release()
        thread.join(10)
        assert result, "the waiter never got the lock"
        assert make(name).holder().token == result[0].info.token
        result[0].release()

    def test_release_is_idempotent(self, make, name):
        guard = make(name).try_lock()
        guard.release()
        guard.release()
        other = make(name).try_lock()  # the second release did not free someone else's lock
        guard.release()
        assert make(name).is_locked()
        other.release()

    def test_a_stale_guard_never_releases_the_new_holders_lock(self, make, name):
        old = make(name).try_lock()
        assert make(name).release_all() is True
        new = make(name).try_lock()
        old.release()
        assert make(name).holder().token == new.info.token
        with pytest.raises(AlreadyRunning):
            make(name).try_lock()
        new.release()

    def test_release_all(self, make, name):
        assert make(name).release_all() is False
        guard = make(name).try_lock()
        assert make(name).release_all() is True
        assert not make(name).is_locked()
        make(name).try_lock().release()
        guard.release()

    def test_names_are_distinct_and_shown_as_given(self, make, name):
        guards = []
        try:
            for suffix in TRICKY_NAMES:
                guards.append(make(name + suffix).try_lock())
            for suffix, guard in zip(TRICKY_NAMES, guards, strict=True):
                holder = make(name + suffix).holder()
                assert holder is not None
                assert holder.name == name + suffix
                assert holder.token == guard.info.token
        finally:
            for guard in guards:
                guard.release()

    @pytest.mark.parametrize("bad", ["", "nul\0inside"])
    def test_bad_names_are_value_errors(self, make, bad):
        with pytest.raises(ValueError, match="must not"):
            make(bad)

    def test_two_threads_exclude_each_other(self, make, name):
        inside = 0
        overlaps = 0
        counter = {"n": 0}

        def work() -> None:
            nonlocal inside, overlaps
            for _ in range(100):
                with make(name).lock(timeout=30):
                    inside += 1
                    overlaps += inside > 1
                    value = counter["n"]
                    time.sleep(0)
                    counter["n"] = value + 1
                    inside -= 1

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert overlaps == 0
        assert counter["n"] == 400

    def test_fluent_copies_leave_the_original_alone(self, make, name):
        original = make(name, timeout=5)
        assert original.with_timeout(0).timeout == 0
        assert original.timeout == 5
        other = original.with_strategy("memory")
        assert other.strategy == "memory"
        assert original.strategy == self.strategy
        assert other is not original

    def test_settings_timeout_is_the_default_wait(self, make, name, settings):
        settings.ISOLATABLE = {**settings.ISOLATABLE, "TIMEOUT": 0}
        with make(name).lock(), pytest.raises(AlreadyRunning):
            make(name).lock()

    def test_garbage_collected_guard_releases(self, make, name):
        make(name).try_lock()  # the guard is dropped at once
        gc.collect()
        make(name).try_lock().release()

    def test_guard_of_a_non_expiring_or_fresh_lease_is_not_lost(self, make, name):
        with make(name).lock() as guard:
            assert guard.lost is False
            guard.check()

    def test_list_shows_held_locks(self, make, name):
        with make(name).lock() as guard:
            listed = [info for info in make(name).backend.list() if info.name == name]
            assert [info.token for info in listed] == [guard.info.token]

    def locks(self, *args: str) -> str:
        stdout = io.StringIO()
        call_command("locks", "--strategy", self.strategy, *args, stdout=stdout)
        return stdout.getvalue()

    def test_locks_status(self, make, name):
        assert json.loads(self.locks("status", name, "--json"))[0]["state"] == "free"
        with make(name).lock() as guard:
            (row,) = json.loads(self.locks("status", name, "--json"))
            assert set(row) == {
                "name", "strategy", "state", "pid", "host", "started_at", "age_seconds",
                "command", "expires_at", "label", "mode", "fencing_token",
            }  # fmt: skip
            assert row["name"] == name
            assert row["strategy"] == self.strategy
            assert row["state"] == "held"
            assert row["pid"] == os.getpid()
            assert row["started_at"] == guard.info.acquired_at.isoformat()
            assert row["age_seconds"] >= 0
            listed = json.loads(self.locks("status", "--json"))
            assert name in [row["name"] for row in listed]
            table = self.locks("status", name)
            assert table.splitlines()[0].split() == [
                "NAME", "STATE", "PID", "HOST", "STARTED", "(UTC)", "AGE", "COMMAND",
            ]  # fmt: skip
            assert f"  held   {os.getpid()}  " in table

    def test_a_label_is_kept_in_the_record_and_shown_by_locks_status(self, make, name):
        label = "celery 1f0c-*/%s ünï 🔒"
        with make(name, label=label).lock() as guard:
            assert guard.info.label == label
            assert make(name).holder().label == label
            (row,) = json.loads(self.locks("status", name, "--json"))
            assert row["label"] == label
            assert row["mode"] == "exclusive"
            table = self.locks("status", name, "--wide")
            assert table.splitlines()[0].split()[-2:] == ["LABEL", "COMMAND"]
            assert label in table
        with make(name).lock():
            assert make(name).holder().label is None
            assert json.loads(self.locks("status", name, "--json"))[0]["label"] is None

    def test_alock_takes_waits_and_is_cancelled_without_leaving_anything_held(self, make, name):
        async def scenario() -> None:
            def locked() -> bool:  # a sync call: off the loop (the database strategy refuses)
                return make(name).is_locked()

            async with make(name).alock() as guard:
                assert await asyncio.to_thread(locked)
                with pytest.raises(AlreadyRunning):
                    await make(name).atry_lock()
                with pytest.raises(LockTimeout):
                    await make(name).alock(timeout=0.2)
                waiter = asyncio.ensure_future(make(name).alock(timeout=None))
                await asyncio.sleep(0.3)
                assert not waiter.done()
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
            assert guard.info.name == name
            # The cancelled wait's worker gives up within a slice and frees what it took.
            await asyncio.sleep(ASYNC_SLICE * 3)
            deadline = time.monotonic() + 5
            while await asyncio.to_thread(locked) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            taken = await make(name).atry_lock()
            await taken.arelease()
            await taken.arelease()  # idempotent
            assert not await asyncio.to_thread(locked)

        asyncio.run(scenario())

    def test_a_guard_dropped_in_async_code_is_released_off_the_loop(self, make, name):
        def locked() -> bool:
            return make(name).is_locked()

        async def scenario() -> None:
            guard = await make(name).alock()
            assert await asyncio.to_thread(locked)
            del guard  # never released: its finalizer runs here, on the loop's thread
            gc.collect()
            deadline = time.monotonic() + 2  # well within the database strategy's TTL here
            while await asyncio.to_thread(locked):
                assert time.monotonic() < deadline, "the dropped guard's lock was never freed"
                await asyncio.sleep(0.05)

        asyncio.run(scenario())

    def test_a_waiting_alock_gets_the_lock_when_it_is_released(self, make, name):
        async def scenario() -> None:
            held = await make(name).alock()
            waiter = asyncio.ensure_future(make(name).alock(timeout=10))
            await asyncio.sleep(0.2)
            await held.arelease()
            guard = await asyncio.wait_for(waiter, 10)
            assert guard.info.pid == os.getpid()
            assert not guard.lost
            await guard.arelease()

        asyncio.run(scenario())

    def test_locks_release_refuses_a_live_holder_without_force(self, make, name):
        with make(name).lock():
            with pytest.raises(CommandError) as raised:
                self.locks("release", name)
            assert raised.value.returncode == 1
            assert make(name).is_locked()
            assert "Force-released" in self.locks("release", name, "--force")
            assert not make(name).is_locked()
        assert self.locks("release", name) == f"{name} is not locked.\n"
