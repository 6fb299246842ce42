"""The semaphore and shared abilities in the conformance suite: ``LockConformance`` inherits
``HolderConformance``, so every strategy runs these (with its ``make`` and ``name`` fixtures).
A strategy without an ability runs the test that it refuses the call with ``IsolationError``."""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time

import pytest
from django.core.management import call_command

from django_isolatable import (
    AlreadyRunning,
    CommandIsolation,
    IsolationError,
    LockTimeout,
    isolated,
)
from django_isolatable.backends.base import Semaphore, Shared

WAIT = 10.0


def _status(strategy: str, name: str) -> list[dict[str, object]]:
    stdout = io.StringIO()
    call_command("locks", "--strategy", strategy, "status", name, "--json", stdout=stdout)
    rows: list[dict[str, object]] = json.loads(stdout.getvalue())
    return rows


class _Inside:
    """Counts the threads inside a section; remembers the most there ever were at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.most = 0
        self.modes: list[str] = []

    def enter(self, mode: str = "") -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.modes.append(mode)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


class HolderConformance:
    strategy: str

    def semaphore(self, make, name, n: int = 3) -> CommandIsolation:
        isolation: CommandIsolation = make(name, max_holders=n)
        if not isinstance(isolation.backend, Semaphore):
            pytest.fail(f"the {self.strategy} strategy has no semaphores")
        return isolation

    def shared(self, make, name) -> CommandIsolation:
        isolation: CommandIsolation = make(name)
        if not isinstance(isolation.backend, Shared):
            pytest.skip(f"the {self.strategy} strategy refuses shared locks (tested below)")
        return isolation

    # Semaphores

    def test_a_semaphore_has_up_to_n_holders_and_refuses_one_more(self, make, name):
        isolation = self.semaphore(make, name)
        guards = [isolation.try_lock() for _ in range(3)]
        try:
            assert len({g.info.token for g in guards}) == 3
            holders = isolation.holders()
            assert sorted(h.token for h in holders) == sorted(g.info.token for g in guards)
            assert {(h.mode, h.max_holders, h.alive, h.pid) for h in holders} == {
                ("semaphore", 3, True, os.getpid())
            }
            assert isolation.is_locked()
            assert isolation.holder() in holders
            started = time.monotonic()
            with pytest.raises(AlreadyRunning) as raised:
                make(name, max_holders=3).try_lock()
            assert time.monotonic() - started < 5
            assert raised.value.holder is not None
            assert raised.value.holder.token in {g.info.token for g in guards}
            guards.pop(1).release()
            assert len(isolation.holders()) == 2
            guards.append(make(name, max_holders=3).try_lock())
            assert len(isolation.holders()) == 3
        finally:
            for guard in guards:
                guard.release()
        assert isolation.holders() == []
        assert not isolation.is_locked()
        assert isolation.holder() is None

    def test_a_stale_semaphore_guard_never_releases_another_holders_slot(self, make, name):
        isolation = self.semaphore(make, name, 2)
        first = isolation.try_lock()
        second = isolation.try_lock()
        first.release()
        third = isolation.try_lock()
        first.release()  # idempotent: touches neither holder
        assert sorted(h.token for h in isolation.holders()) == sorted(
            [second.info.token, third.info.token]
        )
        assert not second.lost
        assert not third.lost
        second.release()
        third.release()
        assert isolation.holders() == []

    def test_a_different_max_holders_while_held_is_an_isolation_error(self, make, name):
        with self.semaphore(make, name, 3).try_lock():
            for other in (2, 1):
                with pytest.raises(IsolationError) as raised:
                    make(name, max_holders=other).try_lock()
                assert not isinstance(raised.value, AlreadyRunning)
                assert "max_holders=3" in str(raised.value)
                assert f"max_holders={other}" in str(raised.value)
        with make(name).try_lock():  # a plain lock's holder counts as 1
            with pytest.raises(IsolationError) as raised:
                make(name, max_holders=3).try_lock()
            assert not isinstance(raised.value, AlreadyRunning)
            assert "max_holders=1" in str(raised.value)
        with make(name, max_holders=2).try_lock():  # free again: any count may take it
            pass

    def test_a_waiter_gets_a_slot_when_a_holder_releases(self, make, name):
        isolation = self.semaphore(make, name, 2)
        held = [isolation.try_lock(), isolation.try_lock()]
        got = []
        waiter = threading.Thread(
            target=lambda: got.append(make(name, max_holders=2).lock(timeout=WAIT))
        )
        waiter.start()
        time.sleep(0.3)
        assert not got
        held[0].release()
        waiter.join(WAIT + 5)
        assert got
        assert not got[0].lost
        got[0].release()
        held[1].release()
        with pytest.raises(LockTimeout), isolation.try_lock(), isolation.try_lock():
            make(name, max_holders=2).lock(timeout=0.3)

    def test_threads_never_exceed_the_semaphore(self, make, name):
        self.semaphore(make, name, 2)
        inside = _Inside()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                isolation = make(name, max_holders=2)
                for _ in range(15):
                    with isolation.lock(timeout=WAIT):
                        inside.enter()
                        time.sleep(0.005)
                        inside.leave()
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        assert inside.most == 2

    def test_locks_status_has_a_row_per_holder_and_release_frees_every_slot(self, make, name):
        isolation = self.semaphore(make, name, 3)
        guards = [isolation.try_lock(), isolation.try_lock()]
        rows = _status(self.strategy, name)
        assert (
            sorted((r["mode"], r["state"], r["pid"]) for r in rows)
            == [("semaphore", "held", os.getpid())] * 2
        )
        stdout = io.StringIO()
        call_command("locks", "--strategy", self.strategy, "status", name, stdout=stdout)
        assert stdout.getvalue().count("semaphore of 3") == 2
        call_command(
            "locks", "--strategy", self.strategy, "release", name, "--force", stdout=io.StringIO()
        )
        assert isolation.holders() == []
        for guard in guards:
            guard.release()
            assert guard.lost  # found no longer held
        guards = [isolation.try_lock(), isolation.try_lock()]
        assert isolation.release_all()
        assert isolation.holders() == []
        for guard in guards:
            guard.release()

    def test_decorated_calls_share_a_semaphore(self, make, name):
        self.semaphore(make, name, 2)
        inside = _Inside()
        release = threading.Event()

        @isolated(name, strategy=self.strategy, max_holders=2, if_running="raise")
        def job() -> str:
            inside.enter()
            release.wait(WAIT)
            inside.leave()
            return "done"

        results: list[object] = []
        threads = [threading.Thread(target=lambda: results.append(job())) for _ in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + WAIT
        while inside.now < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(AlreadyRunning):
            job()
        release.set()
        for thread in threads:
            thread.join(WAIT)
        assert results == ["done", "done"]

    def test_alock_takes_a_semaphore_slot(self, make, name):
        isolation = self.semaphore(make, name, 2)

        async def scenario() -> None:
            first = await isolation.alock()
            async with isolation.atry_lock() as second:
                assert second.info.mode == "semaphore"
                with pytest.raises(AlreadyRunning):
                    await isolation.atry_lock()
            await first.arelease()

        asyncio.run(scenario())
        assert isolation.holders() == []

    # Shared and exclusive

    def test_a_strategy_without_shared_locks_refuses_them(self, make, name):
        isolation = make(name)
        if isinstance(isolation.backend, Shared):
            pytest.skip(f"the {self.strategy} strategy has shared locks")
        with pytest.raises(IsolationError) as raised:
            isolation.lock(shared=True)
        assert not isinstance(raised.value, AlreadyRunning)
        assert self.strategy in str(raised.value)
        assert isolation.holders() == []

    def test_shared_with_max_holders_is_a_value_error(self, make, name):
        with pytest.raises(ValueError, match="shared=True cannot be combined with max_holders"):
            make(name, max_holders=2).lock(shared=True)
        with pytest.raises(ValueError, match="max_holders"):
            isolated(name, max_holders=2, shared=True)

    def test_shared_holds_coexist_and_exclude_an_exclusive_one(self, make, name):
        isolation = self.shared(make, name)
        first = isolation.try_lock(shared=True)
        second = make(name).try_lock(shared=True)
        try:
            holders = isolation.holders()
            assert sorted(h.token for h in holders) == sorted([first.info.token, second.info.token])
            assert {(h.mode, h.alive) for h in holders} == {("shared", True)}
            assert isolation.is_locked()
            with pytest.raises(AlreadyRunning) as raised:
                make(name).try_lock()
            assert raised.value.holder is not None
            assert raised.value.holder.mode == "shared"
            rows = _status(self.strategy, name)
            assert sorted(r["mode"] for r in rows) == ["shared", "shared"]
        finally:
            first.release()
        with pytest.raises(AlreadyRunning):
            make(name).try_lock()
        second.release()
        assert isolation.holders() == []
        with make(name).try_lock() as exclusive:
            assert exclusive.info.mode == "exclusive"
            with pytest.raises(AlreadyRunning):
                make(name).try_lock(shared=True)
        with make(name).try_lock(shared=True):
            pass

    def test_a_waiting_exclusive_locker_holds_off_new_shared_holds(self, make, name):
        isolation = self.shared(make, name)
        reader = isolation.try_lock(shared=True)
        got = []
        writer = threading.Thread(target=lambda: got.append(make(name).lock(timeout=WAIT)))
        writer.start()
        try:
            time.sleep(0.5)
            assert not got
            with pytest.raises(AlreadyRunning):  # writer preference: it waits behind the writer
                make(name).try_lock(shared=True)
            reader.release()
            writer.join(WAIT + 5)
            assert got
            assert got[0].info.mode == "exclusive"
        finally:
            reader.release()
            writer.join(WAIT + 5)
            for guard in got:
                guard.release()
        assert isolation.holders() == []

    def test_a_stale_shared_guard_never_releases_another_hold(self, make, name):
        isolation = self.shared(make, name)
        first = isolation.try_lock(shared=True)
        first.release()
        second = isolation.try_lock(shared=True)
        first.release()
        assert [h.token for h in isolation.holders()] == [second.info.token]
        second.release()
        assert isolation.holders() == []

    def test_threads_mix_shared_and_exclusive_holds_safely(self, make, name):
        self.shared(make, name)
        inside = _Inside()
        overlaps: list[str] = []
        errors: list[BaseException] = []
        exclusive_inside = threading.Event()

        def work(shared: bool) -> None:
            try:
                isolation = make(name)
                for _ in range(10):
                    with isolation.lock(timeout=WAIT, shared=shared):
                        if not shared:
                            exclusive_inside.set()
                            if inside.now:
                                overlaps.append("exclusive entered beside others")
                        elif exclusive_inside.is_set():
                            overlaps.append("shared entered beside an exclusive hold")
                        inside.enter("shared" if shared else "exclusive")
                        time.sleep(0.01)
                        inside.leave()
                        if not shared:
                            exclusive_inside.clear()
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i % 3 != 0,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert not errors
        assert not overlaps
        assert inside.most >= 2  # shared holds did overlap

    def test_alock_and_the_decorator_take_shared_holds(self, make, name):
        isolation = self.shared(make, name)

        @isolated(name, strategy=self.strategy, shared=True, if_running="raise")
        def read() -> str:
            return "read"

        async def scenario() -> None:
            async with isolation.alock(shared=True) as first:
                assert first.info.mode == "shared"
                second = await isolation.atry_lock(shared=True)
                assert read() == "read"
                with pytest.raises(AlreadyRunning):
                    await isolation.atry_lock()
                await second.arelease()

        asyncio.run(scenario())
        assert isolation.holders() == []
