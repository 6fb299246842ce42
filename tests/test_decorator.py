"""``isolated()``: functions, coroutine functions and methods that run at most once at a time.

In-process tests hold the lock through another ``CommandIsolation`` of the same name (on the
file strategy two locks of one process exclude each other like two processes); the last tests
race two real processes on the file and redis strategies.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.management import call_command

from django_isolatable import (
    AlreadyRunning,
    CommandIsolation,
    LockGuard,
    LockTimeout,
    current_guard,
    isolated,
)
from tests import services
from tests.processes import Worker, Workers
from tests.settings import KEY_PREFIX


def held(name: str) -> LockGuard:
    """Take ``name`` as another holder would (the test's strategy)."""
    return CommandIsolation(name).try_lock()


def is_locked(name: str) -> bool:
    return CommandIsolation(name).is_locked()


@isolated()
def module_level() -> str | None:
    guard = current_guard()
    return None if guard is None else guard.info.name


# The name a decorated function gets by default: "<module>.<qualname>".


def test_the_default_name_is_the_module_and_qualname():
    assert module_level() == "tests.test_decorator.module_level"
    with held("tests.test_decorator.module_level"):
        assert module_level() is None


def test_a_method_is_named_after_its_class_and_fills_templates_from_self():
    class Importer:
        def __init__(self, feed: str) -> None:
            self.feed = feed

        @isolated()
        def run(self) -> str:
            return current_guard().info.name

        @isolated("import:{self.feed}", label="importer of {self.feed}")
        def feed_run(self) -> tuple[str, str | None]:
            info = current_guard().info
            return info.name, info.label

    qualname = "test_a_method_is_named_after_its_class_and_fills_templates_from_self"
    assert Importer("a").run() == f"tests.test_decorator.{qualname}.<locals>.Importer.run"
    assert Importer("b").feed_run() == ("import:b", "importer of b")
    with held("import:c"):
        assert Importer("c").feed_run() is None
        assert Importer("d").feed_run() == ("import:d", "importer of d")


# Templates over the bound arguments.


def test_templates_are_filled_from_bound_arguments_with_defaults_applied():
    calls = []

    @isolated("import:{feed}:{day}", label="{feed} for {day}")
    def import_feed(day: str, feed: str = "customers") -> None:
        info = current_guard().info
        calls.append((info.name, info.label))

    import_feed("mon")
    import_feed(day="tue", feed="orders")
    import_feed("wed", "stock")
    assert calls == [
        ("import:customers:mon", "customers for mon"),
        ("import:orders:tue", "orders for tue"),
        ("import:stock:wed", "stock for wed"),
    ]


def test_different_arguments_are_different_locks_and_the_same_ones_exclude():
    @isolated("sync:{account_id}")
    def sync(account_id: int) -> int:
        return account_id

    with held("sync:1"):
        assert sync(1) is None
        assert sync(2) == 2
    assert sync(1) == 1


def test_attribute_access_item_access_and_format_specs_in_templates():
    @isolated("report:{order.customer.id:05d}:{options[region]}")
    def report(order: Any, options: dict[str, str]) -> str:
        return current_guard().info.name

    order = SimpleNamespace(customer=SimpleNamespace(id=42))
    assert report(order, {"region": "eu"}) == "report:00042:eu"


def test_keyword_only_and_var_keyword_arguments_fill_placeholders():
    @isolated("job:{kind}:{tenant}", label="{kind} by {user}")
    def job(*, kind: str = "daily", **kwargs: Any) -> tuple[str, str | None]:
        info = current_guard().info
        return info.name, info.label

    assert job(tenant="acme", user="ann") == ("job:daily:acme", "daily by ann")
    assert job(kind="weekly", tenant="x", user="bo") == ("job:weekly:x", "weekly by bo")


def test_a_var_keyword_placeholder_the_call_lacks_is_a_value_error_before_anything_runs():
    ran = []

    @isolated("job:{tenant}")
    def job(**kwargs: Any) -> None:
        ran.append(kwargs)

    with pytest.raises(ValueError, match=r"'job:\{tenant\}' of .*job .*no argument 'tenant'"):
        job(user="ann")
    assert ran == []


def test_an_attribute_the_argument_lacks_is_a_value_error_naming_the_template():
    @isolated("import:{feed.slug}")
    def run(feed: object) -> None:
        pytest.fail("ran without its lock name")

    with pytest.raises(ValueError, match=r"'import:\{feed.slug\}' .* cannot be filled in"):
        run(object())


def test_a_call_that_does_not_fit_the_signature_fails_as_the_call_would():
    @isolated("sync:{account_id}")
    def sync(account_id: int) -> None:
        pytest.fail("called with a bad call")

    with pytest.raises(TypeError, match="missing a required argument: 'account_id'"):
        sync()


def test_doubled_braces_are_literal_braces_with_or_without_placeholders():
    @isolated("literal {{braces}}", label="{{label}}")
    def run() -> tuple[str, str | None]:
        info = current_guard().info
        return info.name, info.label

    @isolated("literal {{braces}} {key}", label="{{label}} {key}")
    def run_with(key: str) -> tuple[str, str | None]:
        info = current_guard().info
        return info.name, info.label

    assert run() == ("literal {braces}", "{label}")
    assert run_with("k") == ("literal {braces} k", "{label} k")


def test_a_formatted_label_longer_than_200_characters_is_cut_to_200():
    @isolated("long-label", label="{text}")
    def run(text: str) -> str | None:
        return current_guard().info.label

    label = run("x" * 500)
    assert len(label) == 200
    assert label == "x" * 199 + "\u2026"
    assert run("y" * 200) == "y" * 200
    assert run("nul\0inside") == "nul\\0inside"


def test_a_formatted_name_that_is_empty_is_a_value_error_at_the_call():
    @isolated("{name}")
    def run(name: str) -> None:
        pytest.fail("ran without a valid lock name")

    with pytest.raises(ValueError, match="A lock name must not be empty"):
        run("")


# Mistakes caught at decoration time.


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("sync:{account}", r"names \{account\}, which is not an argument of .*sync\(account_id"),
        ("sync:{}", "has a positional placeholder: name the argument"),
        ("sync:{0}", "has a positional placeholder"),
        ("sync:{0.id}", "has a positional placeholder"),
        ("sync:{account_id", "is not a valid template"),
    ],
)
@pytest.mark.parametrize("what", ["name", "label"])
def test_a_placeholder_the_signature_cannot_fill_is_a_value_error_at_decoration(
    template, message, what
):
    def sync(account_id: int) -> None: ...

    with pytest.raises(ValueError, match=f"The lock {what} .*{message}"):
        isolated(**{what: template})(sync)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"if_running": "wait"}, 'if_running must be "skip" or "raise", not \'wait\''),
        ({"if_running": None}, 'if_running must be "skip" or "raise"'),
        ({"timeout": -1}, "timeout must be None .* or seconds >= 0, not -1"),
        ({"timeout": "5"}, "timeout must be None .* not '5'"),
        ({"timeout": True}, "timeout must be None"),
        ({"timeout": float("nan")}, "timeout must be None"),
        ({"ttl": 0}, "ttl must be a number of seconds > 0"),
        ({"ttl": -3}, "ttl must be a number of seconds > 0"),
        ({"ttl": "60"}, "ttl must be a number of seconds > 0"),
        ({"label": "x" * 201}, "A lock label must be at most 200 characters"),
        ({"label": "a{x}" + "b" * 200}, "A lock label must be at most 200 characters"),
        ({"label": "nul\0"}, "without NUL"),
        ({"label": 7}, "label must be a str template"),
        ({"name": 7}, "name must be a str template"),
    ],
)
def test_bad_options_are_value_errors_at_decoration(options, message):
    with pytest.raises(ValueError, match=message):
        isolated(**options)


def test_a_label_of_exactly_200_characters_is_accepted():
    @isolated("label-200", label="z" * 200)
    def run() -> str | None:
        return current_guard().info.label

    assert run() == "z" * 200


def test_generator_functions_are_refused_their_body_would_run_unlocked():
    def numbers() -> Iterator[int]:
        yield 1

    async def agen() -> Any:
        yield 1

    with pytest.raises(TypeError, match=r"cannot wrap the generator function .*numbers: "):
        isolated()(numbers)
    with pytest.raises(TypeError, match=r"generator function .*agen: "):
        isolated()(agen)


# Skip or raise, and how long to wait.


def test_skip_returns_none_without_calling_and_logs_at_info_with_the_fields(caplog):
    calls = []

    @isolated("skipped-job")
    def job() -> str:
        calls.append(1)
        return "ran"

    with held("skipped-job") as guard, caplog.at_level(logging.INFO, "django_isolatable"):
        assert job() is None
    assert calls == []
    (record,) = [r for r in caplog.records if r.name == "django_isolatable.decorators"]
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith("Skipped skipped-job: ")
    assert record.lock_name == "skipped-job"
    assert record.lock_strategy == "file"
    assert record.holder_pid == guard.info.pid
    assert job() == "ran"


def test_raise_raises_already_running_with_the_holder():
    @isolated("raising-job", if_running="raise")
    def job() -> None:
        pytest.fail("ran while the lock was held")

    with held("raising-job") as guard, pytest.raises(AlreadyRunning) as raised:
        job()
    assert not isinstance(raised.value, LockTimeout)
    assert raised.value.command == "raising-job"
    assert raised.value.holder.token == guard.info.token


def test_raise_with_a_timeout_waits_about_that_long_then_raises_lock_timeout():
    @isolated("timed-job", if_running="raise", timeout=0.3)
    def job() -> None:
        pytest.fail("ran while the lock was held")

    with held("timed-job"):
        started = time.monotonic()
        with pytest.raises(LockTimeout) as raised:
            job()
        waited = time.monotonic() - started
    assert raised.value.timeout == pytest.approx(0.3)
    assert 0.25 <= waited < 5


def test_skip_with_a_timeout_waits_then_returns_none():
    @isolated("timed-skip", timeout=0.3)
    def job() -> str:
        return "ran"

    with held("timed-skip"):
        started = time.monotonic()
        assert job() is None
        assert time.monotonic() - started >= 0.25


def test_a_timeout_gets_the_lock_when_the_holder_releases_in_time():
    @isolated("handed-over", timeout=10)
    def job() -> str:
        return "ran"

    guard = held("handed-over")
    threading.Timer(0.2, guard.release).start()
    assert job() == "ran"


def test_timeout_none_waits_as_long_as_it_takes():
    @isolated("waits-forever", timeout=None, if_running="raise")
    def job() -> float:
        return time.monotonic()

    guard = held("waits-forever")
    released = []

    def release() -> None:
        released.append(time.monotonic())
        guard.release()

    threading.Timer(0.5, release).start()
    ran_at = job()
    assert released
    assert ran_at >= released[0]


# The held lock, seen from inside the call.


def test_current_guard_is_the_held_guard_inside_and_none_outside():
    assert current_guard() is None

    @isolated("guarded")
    def job() -> LockGuard:
        guard = current_guard()
        assert guard is not None
        guard.check()  # holds: no LockLost
        assert is_locked("guarded")
        return guard

    guard = job()
    assert current_guard() is None
    assert guard.info.name == "guarded"
    assert not is_locked("guarded")


def test_current_guard_is_restored_after_nested_calls_even_when_they_raise():
    @isolated("inner")
    def inner(fail: bool) -> str:
        if fail:
            raise RuntimeError("inner failed")
        return current_guard().info.name

    @isolated("outer")
    def outer() -> list[str]:
        seen = [current_guard().info.name, inner(False), current_guard().info.name]
        with pytest.raises(RuntimeError):
            inner(True)
        seen.append(current_guard().info.name)
        return seen

    assert outer() == ["outer", "inner", "outer", "outer"]
    assert current_guard() is None


def test_a_recursive_call_finds_its_own_lock_held_and_is_skipped():
    depth = []

    @isolated("recursive")
    def walk() -> str:
        depth.append(1)
        assert walk() is None  # not re-entrant: the lock is held, by this very call
        return "done"

    assert walk() == "done"
    assert depth == [1]


def test_current_guard_is_per_thread():
    seen: dict[str, str | None] = {}
    inside = threading.Event()
    done = threading.Event()

    @isolated("in-thread")
    def job() -> None:
        inside.set()
        done.wait(10)

    def look() -> None:
        inside.wait(10)
        guard = current_guard()
        seen["other thread"] = None if guard is None else guard.info.name
        done.set()

    thread = threading.Thread(target=look)
    thread.start()
    job()
    thread.join(10)
    assert seen == {"other thread": None}


@pytest.mark.parametrize("strategy", ["file", "memory"])
def test_two_threads_calling_at_once_run_it_once(strategy):
    inside = threading.Event()
    skipped = threading.Event()
    ran = []

    @isolated("threads", strategy=strategy)
    def job() -> str:
        ran.append(threading.get_ident())
        inside.set()
        assert skipped.wait(10), "the other thread's call did not come back"
        return "ran"

    def second() -> None:
        assert inside.wait(10)
        if job() is None:
            skipped.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert job() == "ran"
    thread.join(10)
    assert ran == [threading.get_ident()]


def test_a_function_that_raises_releases_the_lock_and_the_error_propagates():
    @isolated("failing")
    def job() -> None:
        assert is_locked("failing")
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        job()
    assert not is_locked("failing")
    assert current_guard() is None
    held("failing").release()  # free for the next


def test_functools_wraps_metadata_is_kept():
    def original(account_id: int, *, dry_run: bool = False) -> str:
        """Sync one account."""
        return str(account_id)

    async def coroutine(feed: str = "x") -> None:
        """Import one feed."""

    for function in (original, coroutine):
        wrapped = isolated()(function)
        assert wrapped.__name__ == function.__name__
        assert wrapped.__qualname__ == function.__qualname__
        assert wrapped.__doc__ == function.__doc__
        assert wrapped.__module__ == function.__module__
        assert wrapped.__wrapped__ is function
        assert inspect.signature(wrapped) == inspect.signature(function)
    assert inspect.iscoroutinefunction(isolated()(coroutine))
    assert not inspect.iscoroutinefunction(isolated()(original))


def test_a_callable_without_a_qualname_needs_a_name():
    def add(a: int, b: int) -> int:
        return a + b

    partial = functools.partial(add, 1)
    with pytest.raises(ValueError, match="has no __qualname__ to name its lock: give isolated"):
        isolated()(partial)
    add_one = isolated("add:{b}")(partial)
    assert add_one(2) == 3
    with held("add:2"):
        assert add_one(2) is None


# strategy= and ttl= reach the lock.


def test_strategy_and_ttl_pass_through(settings):
    @isolated("passed-through", strategy="memory", ttl=12.5)
    def job() -> tuple[str, float]:
        isolation = current_guard().isolation
        return isolation.strategy, isolation.ttl

    assert job() == ("memory", 12.5)
    with CommandIsolation("passed-through", strategy="memory").lock():
        assert job() is None
    with held("passed-through"):  # the file strategy's lock of that name is another lock
        assert job() == ("memory", 12.5)


def test_the_settings_strategy_is_read_at_call_time(settings):
    @isolated("late-strategy")
    def job() -> str:
        return current_guard().isolation.strategy

    assert job() == "file"
    settings.ISOLATABLE = {**settings.ISOLATABLE, "STRATEGY": "memory"}
    assert job() == "memory"


# Coroutine functions take the async path.


def test_a_coroutine_function_runs_isolated_and_skips_or_raises():
    @isolated("async-job")
    async def job() -> str:
        await asyncio.sleep(0)
        return current_guard().info.name

    @isolated("async-job", if_running="raise", timeout=0.2)
    async def raising() -> None:
        pytest.fail("ran while the lock was held")

    async def scenario() -> None:
        assert await job() == "async-job"
        with held("async-job"):
            assert await job() is None
            with pytest.raises(LockTimeout):
                await raising()
        assert current_guard() is None

    asyncio.run(scenario())
    assert not is_locked("async-job")


def test_async_current_guard_is_per_task_and_restored_after_nested_calls():
    async def scenario() -> None:
        entered = {"a": asyncio.Event(), "b": asyncio.Event()}

        @isolated("inner:{key}")
        async def inner(key: str) -> str:
            return current_guard().info.name

        @isolated("task:{key}")
        async def task(key: str) -> list[str]:
            seen = [current_guard().info.name]
            entered[key].set()
            await asyncio.gather(*(event.wait() for event in entered.values()))  # both inside
            seen.append(current_guard().info.name)  # the other task's guard did not leak in
            seen.append(await inner(key))
            seen.append(current_guard().info.name)
            return seen

        a, b = await asyncio.gather(task("a"), task("b"))
        assert a == ["task:a", "task:a", "inner:a", "task:a"]
        assert b == ["task:b", "task:b", "inner:b", "task:b"]
        assert current_guard() is None

    asyncio.run(scenario())


def test_a_coroutine_that_raises_releases_the_lock():
    @isolated("async-failing")
    async def job() -> None:
        raise ValueError("async boom")

    with pytest.raises(ValueError, match="async boom"):
        asyncio.run(job())
    assert not is_locked("async-failing")


def test_an_async_waiter_gets_the_lock_when_the_holder_releases():
    @isolated("async-wait", timeout=10)
    async def job() -> str:
        return "ran"

    guard = held("async-wait")
    threading.Timer(0.2, guard.release).start()
    assert asyncio.run(job()) == "ran"


def test_a_waiting_async_call_that_is_cancelled_leaves_nothing_held():
    ran = []

    @isolated("async-cancelled", timeout=None)
    async def job() -> None:
        ran.append(1)

    async def scenario(holder: LockGuard) -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(job(), 0.3)
        await asyncio.to_thread(holder.release)
        # The cancelled wait's worker gives up within a slice and frees whatever it took.
        deadline = time.monotonic() + 5
        while await asyncio.to_thread(is_locked, "async-cancelled"):
            assert time.monotonic() < deadline, "the cancelled call left the lock held"
            await asyncio.sleep(0.05)
        assert current_guard() is None

    asyncio.run(scenario(held("async-cancelled")))
    assert ran == []
    held("async-cancelled").release()


# Two real processes call the same decorated function at once.

PROCESS_STRATEGIES = [
    pytest.param(({"STRATEGY": "file"}, None), id="file"),
    pytest.param(
        ({"STRATEGY": "redis", "REDIS_URL": services.REDIS_URL, "KEY_PREFIX": KEY_PREFIX}, "redis"),
        id="redis",
    ),
]


@pytest.fixture
def racing(
    request, settings, tmp_path: Path, lock_dir: Path
) -> Iterator[tuple[list[Worker], Path, str]]:
    """Two ``isolated-call`` workers on one lock name with the parametrized strategy (this
    process's settings too); the journal their function writes to; the name."""
    isolatable, service = request.param
    if service is not None:
        services.require(service)
    settings.ISOLATABLE = {**settings.ISOLATABLE, **isolatable}
    name = f"decorated:{tmp_path.name}"
    env = {"ISOLATABLE_TEST_SETTINGS": json.dumps({**isolatable, "LOCK_DIR": str(lock_dir)})}
    journal = tmp_path / "journal"
    journal.touch()
    workers = Workers(tmp_path, name, lock_dir)
    started = [
        workers.start("isolated-call", "--journal", str(journal), "--who", str(who), env=env)
        for who in (0, 1)
    ]
    yield started, journal, name
    workers.close()
    CommandIsolation(name).release_all()


@pytest.mark.parametrize("racing", PROCESS_STRATEGIES, indirect=True)
def test_two_processes_calling_at_once_run_the_function_once(racing):
    started, journal, name = racing
    for worker in started:
        worker.expect("ready")
    for worker in started:
        worker.send("go")
    outcomes = {who: worker.expect("called")[0] for who, worker in enumerate(started)}
    assert sorted(outcomes.values()) == ["ran", "skipped"], outcomes
    (runner,) = [who for who, outcome in outcomes.items() if outcome == "ran"]
    skipper = 1 - runner
    assert started[skipper].expect("returned") == ["None"]

    stdout = io.StringIO()
    call_command("locks", "status", name, "--json", stdout=stdout)
    (row,) = json.loads(stdout.getvalue())
    assert row["state"] == "held"
    assert row["pid"] == started[runner].pid
    assert row["label"] == f"job for worker {runner}"

    started[runner].send("finish")
    assert started[runner].expect("returned") == ["done"]
    for worker in started:
        assert worker.process.wait(30) == 0
    assert journal.read_text().split() == [str(started[runner].pid)]
    assert not is_locked(name)
