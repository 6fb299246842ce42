"""Property tests: a state machine per strategy against a model, and fuzzed lock names.

The state machine drives two or three clients (each its own ``CommandIsolation`` of one lock
name) through try_lock, lock_with_timeout, release (once and twice, by holders and by stale
guards), force-release and take-over, inspection and, for expiring strategies, a lease that
expires behind its holder's back (judged by the store) and release_if_stale. The model is who
holds the lock; after every step the store must agree with it.

A failure prints the shrunk program of steps and a ``@reproduce_failure(...)`` line. To replay
it, pass that decorator to the factory: ``state_machine_test(strategies.REDIS,
reproduce_failure("6.x", b"..."))``.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import event, example, given, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from django_isolatable import (
    AlreadyRunning,
    CommandIsolation,
    LockGuard,
    LockStrategy,
    LockTimeout,
)
from django_isolatable.backends.file import file_name
from tests import strategies
from tests.strategies import StrategyConfig

WAIT = 0.02  # seconds lock_with_timeout waits in the machine: short, every refusal costs it
# Sized so the whole suite stays within CI's time; hypothesis keeps the failing examples it
# finds (.hypothesis/) and replays them first on the next run.
MACHINE_SETTINGS = settings(
    max_examples=15,
    stateful_step_count=20,
    deadline=None,
    print_blob=True,
)
SERVER_SETTINGS = settings(max_examples=30, deadline=None, print_blob=True)
PURE_SETTINGS = settings(max_examples=100, deadline=None, print_blob=True)


@pytest.fixture(autouse=True)
def _database_access(django_db_blocker):
    # The database strategies use connections of their own, not pytest-django's test ones.
    with django_db_blocker.unblock():
        yield


class LockMachine(RuleBasedStateMachine):
    """Clients of one lock name; the model is the guard that holds the lock, or None."""

    config: ClassVar[StrategyConfig]
    clients = Bundle("clients")
    guards = Bundle("guards")
    #: Guards whose lock was taken from them (force-released, expired): released on purpose.
    stale = Bundle("stale")

    def __init__(self) -> None:
        super().__init__()
        self.name = f"properties:{uuid.uuid4().hex}"  # examples never see each other's locks
        self.isolations: list[CommandIsolation] = []
        self.issued: list[LockGuard] = []
        self.holder: LockGuard | None = None
        #: The token of an expired lease whose record the store still keeps.
        self.expired_token: str | None = None
        self.stale_releases = 0
        self._settings = self.config.override_settings()
        self._settings.enable()

    def teardown(self) -> None:
        # Steer generation towards the runs that can catch a stale guard freeing a new holder.
        target(self.stale_releases, label="stale guards released while the lock was held")
        try:
            for guard in self.issued:
                guard.release()
            if self.isolations:
                self.isolations[0].release_all()
        finally:
            self._settings.disable()

    @initialize(target=clients, count=st.integers(2, 3))
    def start_clients(self, count: int) -> Any:
        self.isolations = [
            CommandIsolation(self.name, strategy=self.config.strategy) for _ in range(count)
        ]
        return multiple(*range(count))

    def _took(self, guard: LockGuard) -> LockGuard:
        self.issued.append(guard)
        self.holder = guard
        self.expired_token = None
        return guard

    def _refused(self, error: AlreadyRunning) -> Any:
        assert self.holder is not None
        assert error.command == self.name
        assert error.holder is not None
        assert error.holder.token == self.holder.info.token
        return multiple()

    @rule(target=guards, client=clients)
    def try_lock(self, client: int) -> Any:
        isolation = self.isolations[client]
        if self.holder is None:
            return self._took(isolation.try_lock())
        # Held, by another client or by this one: locks are not reentrant.
        with pytest.raises(AlreadyRunning) as raised:
            isolation.try_lock()
        assert type(raised.value) is AlreadyRunning
        return self._refused(raised.value)

    @rule(target=guards, client=clients)
    def lock_with_timeout(self, client: int) -> Any:
        isolation = self.isolations[client]
        if self.holder is None:
            return self._took(isolation.lock_with_timeout(WAIT))
        started = time.monotonic()
        with pytest.raises(LockTimeout) as raised:
            isolation.lock_with_timeout(WAIT)
        assert time.monotonic() - started >= WAIT
        assert raised.value.timeout == WAIT
        return self._refused(raised.value)

    def _released(self, guard: LockGuard) -> None:
        if guard is not self.holder and self.holder is not None:
            event("a stale guard was released while another guard held the lock")
            self.stale_releases += 1
        if guard is self.holder:
            self.holder = None
        elif guard.info.token == self.expired_token:
            self.expired_token = None  # its own expired record: nobody else's lock

    @rule(guard=guards, times=st.integers(1, 2))
    def release(self, guard: LockGuard, times: int) -> None:
        # Any guard, the holder's or a stale one: a stale guard never frees the new holder,
        # and releasing twice is releasing once.
        for _ in range(times):
            guard.release()
        self._released(guard)

    @rule(guard=stale, times=st.integers(1, 2))
    def release_stale(self, guard: LockGuard, times: int) -> None:
        self.release(guard, times)

    @rule(target=stale, client=clients)
    def force_release(self, client: int) -> Any:
        released = self.isolations[client].release_all()
        assert released == (self.holder is not None or self.expired_token is not None)
        taken = self.holder
        self.holder = None
        self.expired_token = None
        return multiple() if taken is None else taken

    @precondition(lambda self: self.holder is not None)
    @rule(target=guards, client=clients)
    def take_over(self, client: int) -> LockGuard:
        # An operator force-releases the lock and the next run takes it at once; the old
        # holder's guard (in the guards bundle) is stale now.
        assert self.isolations[client].release_all()
        self.holder = None
        self.expired_token = None
        return self._took(self.isolations[client].try_lock())

    @rule(client=clients)
    def inspect(self, client: int) -> None:
        self.check_store(self.isolations[client])

    @invariant()
    def store_agrees_with_model(self) -> None:
        if self.isolations:
            self.check_store(self.isolations[0])

    def check_store(self, isolation: CommandIsolation) -> None:
        holder = isolation.holder()
        if self.holder is not None:
            assert holder is not None, "the lock is held but holder() says nobody"
            assert holder.token == self.holder.info.token, "holder() is not the model's holder"
            assert holder.name == self.name
            assert holder.pid == os.getpid()
            assert holder.alive is True
            assert isolation.is_locked()
            assert self.holder.lost is False
        elif self.expired_token is not None:
            assert holder is not None, "the store dropped an expired record it keeps"
            assert holder.token == self.expired_token
            assert holder.alive is False
            assert not isolation.is_locked()
        else:
            assert holder is None, f"the lock is free but holder() says {holder}"
            assert not isolation.is_locked()


class ExpiringLockMachine(LockMachine):
    """Adds a lease that expires behind its holder's back, as judged by the store."""

    @precondition(lambda self: self.holder is not None)
    @rule(target=LockMachine.stale)
    def expire(self) -> LockGuard:
        expired = self.holder
        assert expired is not None
        assert self.config.expire is not None
        self.config.expire(self.isolations[0], expired)
        if self.config.keeps_expired_records:
            self.expired_token = expired.info.token
        self.holder = None  # free for anyone, the old holder included
        return expired

    @rule(client=LockMachine.clients)
    def release_if_stale(self, client: int) -> None:
        # Only an expired lease is stale here: every holder is this live process.
        released = self.isolations[client].release_if_stale()
        assert released == (self.expired_token is not None)
        self.expired_token = None


def state_machine_test(config: StrategyConfig, *decorators: Callable[[Any], Any]) -> type:
    """A unittest TestCase (collected by pytest) running the lock machine for ``config``.

    ``decorators`` apply to the machine class: ``reproduce_failure(...)`` or ``seed(...)``.
    """
    base = ExpiringLockMachine if config.expire is not None else LockMachine
    title = config.id.title().replace("-", "")
    machine: Any = type(f"{title}LockMachine", (base,), {"config": config})
    for decorate in decorators:
        machine = decorate(machine)

    class StateMachineTest(machine.TestCase):  # type: ignore[name-defined,misc]
        settings = MACHINE_SETTINGS

        def setUp(self) -> None:
            config.require_service()

    StateMachineTest.__name__ = StateMachineTest.__qualname__ = f"Test{title}LockMachine"
    return StateMachineTest


TestFileLockMachine = state_machine_test(strategies.FILE)
TestMemoryLockMachine = state_machine_test(strategies.MEMORY)
TestRedisLockMachine = state_machine_test(strategies.REDIS)
TestPostgresLockMachine = state_machine_test(strategies.POSTGRES)
TestDatabaseSqliteLockMachine = state_machine_test(strategies.DATABASE_ON_SQLITE)
TestDatabasePostgresLockMachine = state_machine_test(strategies.DATABASE_ON_POSTGRES)
TestDatabaseMariadbLockMachine = state_machine_test(strategies.DATABASE_ON_MARIADB)
TestCacheRedisLockMachine = state_machine_test(strategies.CACHE_ON_REDIS)


# Fuzzed names, file strategy: pure functions, no file is created.

LOCK_DIR = Path("/srv/app/.locks")


@PURE_SETTINGS
@given(name=strategies.lock_names())
def test_lock_path_is_a_valid_file_name_directly_inside_lock_dir(name):
    path = CommandIsolation(name, strategy="file", lock_dir=LOCK_DIR).lock_path()
    assert path is not None
    assert path.parent == LOCK_DIR
    assert os.path.normpath(path) == str(path)  # no "..", "." or "//" that would move it
    entry = path.name
    assert entry == file_name(name)
    assert entry not in ("", ".", "..")
    assert not entry.startswith(".")
    assert "/" not in entry
    assert "\0" not in entry
    assert entry.isascii()
    assert len(os.fsencode(entry)) <= 190  # as file_name documents; every filesystem takes 255


@PURE_SETTINGS
@given(first=strategies.lock_names(), second=strategies.lock_names())
def test_two_names_never_share_a_lock_file(first, second):
    if first != second:
        assert file_name(first) != file_name(second)


@PURE_SETTINGS
@given(pair=strategies.confusable_pairs())
@example(pair=(".", "%2E"))
@example(pair=("a" * 120 + "b", "a" * 120 + "c"))
@example(pair=("~", "%7E"))
def test_confusable_names_never_share_a_lock_file(pair):
    first, second = pair
    assert file_name(first) != file_name(second)


@settings(PURE_SETTINGS, max_examples=50)  # each example is dozens of names
@given(names=st.sets(strategies.lock_names(), min_size=2, max_size=30))
def test_a_set_of_names_maps_to_as_many_lock_files(names):
    assert len({file_name(name) for name in names}) == len(names)


@pytest.mark.parametrize("strategy", [strategy.value for strategy in LockStrategy])
def test_an_empty_name_is_a_value_error(strategy):
    with pytest.raises(ValueError, match=re.escape("A lock name must not be empty.")) as raised:
        CommandIsolation("", strategy=strategy)
    assert str(raised.value) == "A lock name must not be empty."


@PURE_SETTINGS
@given(
    before=st.text(),
    after=st.text(),
    strategy=st.sampled_from([strategy.value for strategy in LockStrategy]),
)
def test_a_name_with_nul_is_a_value_error(before, after, strategy):
    name = f"{before}\0{after}"
    with pytest.raises(ValueError, match="must not contain NUL") as raised:
        CommandIsolation(name, strategy=strategy)
    assert str(raised.value) == f"A lock name must not contain NUL characters: {name!r}."


# Fuzzed names against every strategy's store.


@pytest.fixture(scope="module", params=strategies.CONFIGS, ids=lambda config: config.id)
def config(request) -> StrategyConfig:
    request.param.require_service()
    return request.param


def _assert_held(isolation: CommandIsolation, guard: LockGuard) -> None:
    holder = isolation.holder()
    assert holder is not None, f"{isolation.name!r} is held but holder() says nobody"
    assert holder.name == isolation.name  # the name as given
    assert holder.token == guard.info.token
    assert isolation.is_locked()


@SERVER_SETTINGS
@given(data=st.data())
def test_fuzzed_names_lock_and_never_exclude_each_other(config, data):
    names = strategies.lock_names()
    first_name = data.draw(names, label="first")
    second_name = data.draw(names.filter(lambda name: name != first_name), label="second")
    with config.override_settings():
        first = CommandIsolation(first_name, strategy=config.strategy)
        second = CommandIsolation(second_name, strategy=config.strategy)
        guard = first.try_lock()
        try:
            _assert_held(first, guard)
            other = second.try_lock()  # a different name is a different lock
            try:
                _assert_held(second, other)
            finally:
                other.release()
            assert not second.is_locked()
            _assert_held(first, guard)  # releasing the other name left this one alone
        finally:
            guard.release()
        assert first.holder() is None
        assert not first.is_locked()


@pytest.fixture(scope="module", params=strategies.DATABASE_CONFIGS, ids=lambda c: c.id)
def database_config(request) -> StrategyConfig:
    request.param.require_service()
    return request.param


@SERVER_SETTINGS
@given(name=strategies.names_with_lone_surrogates())
@example(name="\udc80")
def test_database_names_with_lone_surrogates_lock_and_inspect(database_config, name):
    # Text columns take UTF-8 only, so the row keeps such a name escaped; its key is exact.
    with database_config.override_settings():
        isolation = CommandIsolation(name, strategy="database")
        with isolation.try_lock() as guard:
            _assert_held(isolation, guard)
            with pytest.raises(AlreadyRunning):
                CommandIsolation(name, strategy="database").try_lock()
            list(isolation.backend.list())  # listing copes with the escaped row
        assert isolation.holder() is None
