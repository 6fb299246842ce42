"""The periods ability (``once_per``) in the conformance suite: ``LockConformance`` inherits
``PeriodConformance``, so every strategy runs these (with its ``make`` and ``name`` fixtures)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from django_isolatable import AlreadyRan, AlreadyRunning, isolated
from django_isolatable.backends.base import Periods
from django_isolatable.holders import new_record

HOUR = 3600


def wait_for_a_fresh_period(backend: Any, seconds: float, needed: float) -> None:
    """Return once at least ``needed`` seconds of the current period (store clock) are left."""
    left = seconds - backend.store_time() % seconds
    if left < needed:
        time.sleep(left + 0.02)


class PeriodConformance:
    strategy: str

    def test_the_backend_has_the_periods_ability(self, make, name):
        backend = make(name).backend
        assert isinstance(backend, Periods)
        assert abs(backend.store_time() - time.time()) < 5  # this machine's servers agree

    def test_the_first_successful_run_uses_the_period_and_a_second_is_skipped(self, make, name):
        wait_for_a_fresh_period(make(name).backend, HOUR, needed=5)
        with make(name, once_per=HOUR).lock() as guard:
            taken = guard.info
        with pytest.raises(AlreadyRan) as raised:
            make(name, once_per=HOUR).lock()
        error = raised.value
        assert isinstance(error, AlreadyRunning)
        assert error.command == name
        assert error.holder is not None
        assert (error.holder.pid, error.holder.hostname) == (os.getpid(), taken.hostname)
        assert error.holder.acquired_at == taken.acquired_at
        assert error.period_seconds == HOUR
        assert error.next_period_at.timestamp() == (error.period_index + 1) * HOUR
        assert str(error).startswith(
            f"{name} already ran in this period (pid {os.getpid()} on {taken.hostname} at "
            f"{taken.acquired_at:%Y-%m-%d %H:%M:%S} UTC); the next period begins at "
        )
        assert not make(name).is_locked()  # the skipped run released the lock
        make(name).try_lock().release()  # without once_per it is a plain lock
        with make(name, once_per=2 * HOUR).lock():  # periods of another length are others
            pass

    def test_a_failed_run_leaves_the_period_open(self, make, name):
        wait_for_a_fresh_period(make(name).backend, HOUR, needed=5)
        with pytest.raises(RuntimeError), make(name, once_per=HOUR).lock():
            raise RuntimeError("the job failed")
        guard = make(name, once_per=HOUR).lock()  # not skipped
        guard.release()  # released without record_run(): not a success either
        with make(name, once_per=HOUR).lock():
            pass
        with pytest.raises(AlreadyRan):
            make(name, once_per=HOUR).try_lock()

    def test_a_run_in_the_next_period_runs(self, make, name):
        seconds = 0.5
        backend = make(name).backend
        wait_for_a_fresh_period(backend, seconds, needed=0.3)
        with make(name, once_per=seconds).lock():
            pass
        with pytest.raises(AlreadyRan) as raised:
            make(name, once_per=seconds).lock()
        assert raised.value.period_index == int(backend.store_time() // seconds)
        time.sleep(max(0.0, raised.value.next_period_at.timestamp() - backend.store_time()))
        with make(name, once_per=seconds).lock():  # the next period: runs
            pass

    def test_records_are_per_name_period_length_and_period(self, make, name):
        backend = make(name).backend
        wait_for_a_fresh_period(backend, HOUR, needed=5)
        info = new_record(name, self.strategy)
        now = int(backend.store_time() // HOUR)  # a record of a period long over may be gone
        backend.record_run(name, HOUR, now, info)
        found = backend.ran_in(name, HOUR, now)
        assert found is not None
        assert (found.token, found.pid, found.acquired_at) == (
            info.token,
            info.pid,
            info.acquired_at,
        )
        assert backend.ran_in(name, HOUR, now + 1) is None
        assert backend.ran_in(name, HOUR, now - 1) is None
        assert backend.ran_in(name, 2 * HOUR, now) is None
        assert backend.ran_in(name + "x", HOUR, now) is None

    def test_the_decorator_skips_a_call_in_a_period_that_ran(self, make, name):
        wait_for_a_fresh_period(make(name).backend, HOUR, needed=5)
        calls: list[str] = []

        @isolated(name, strategy=self.strategy, once_per=HOUR)
        def job(fail: bool = False) -> str:
            calls.append("failed" if fail else "ran")
            if fail:
                raise ValueError("failed")
            return "done"

        with pytest.raises(ValueError, match="failed"):
            job(fail=True)
        assert job() == "done"
        assert job() is None  # skipped
        assert calls == ["failed", "ran"]

        @isolated(name, strategy=self.strategy, once_per=HOUR, if_running="raise")
        def strict() -> None:
            calls.append("strict")

        with pytest.raises(AlreadyRan):
            strict()
        assert calls == ["failed", "ran"]

    def test_async_runs_are_recorded_off_the_event_loop(self, make, name):
        wait_for_a_fresh_period(make(name).backend, HOUR, needed=5)

        async def scenario() -> None:
            async with make(name, once_per=HOUR).alock():
                pass
            with pytest.raises(AlreadyRan):
                await make(name, once_per=HOUR).atry_lock()

        asyncio.run(scenario())
