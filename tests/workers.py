"""Worker processes for the process tests (``tests/processes.py`` starts them).

Run as ``python -m tests.workers COMMAND NAME LOCK_DIR [options]`` with
``DJANGO_SETTINGS_MODULE=tests.settings`` from the repository root. The strategy is the
settings' (``ISOLATABLE_TEST_SETTINGS`` in the environment; the file strategy by default). Every
command takes the lock through ``CommandIsolation(NAME, lock_dir=LOCK_DIR)`` and reports each
event as one line on stdout (``held <pid> <token>``, ``acquired <monotonic> <pid> <token>``,
...), so a test awaits events instead of sleeping. A worker that keeps a lock keeps it until it
reads a line (or EOF) on stdin.

Commands:

``count``
    Print ``ready``, wait for ``go``, then take the lock ``--iterations`` times, each time doing a
    non-atomic read-modify-write of the integer in ``--counter``. Each critical section's
    ``time.monotonic()`` interval is written to ``--journal`` as ``<pid> <start> <end>`` lines.
``hold``
    Take the lock at once (``try_lock``; a slot of ``--max-holders N``, or a shared hold with
    ``--shared``), print ``held``, keep it until told. While it holds,
    each ``lost?`` line on stdin is answered with ``lost True`` or ``lost False``
    (``guard.lost``).
``wait``
    Wait for the lock with ``lock(timeout=--timeout)``; print ``waiting`` once the wait loop has
    reported progress (so the caller knows it is blocked), then ``acquired`` (or ``timeout``),
    and keep the lock until told.
``isolated-call``
    Print ``ready``, wait for ``go``, then call a function decorated with ``isolated(NAME,
    label="job for worker {who}")`` (the settings' LOCK_DIR, not LOCK_DIR: the decorator takes
    none). Inside, it appends its pid to ``--journal``, prints ``called ran`` and waits for a
    line; a skipped call prints ``called skipped``. Then ``returned <its return value>``.
``once``
    Print ``ready``, wait for ``go``, then run a job under ``CommandIsolation(NAME, lock_dir=...,
    once_per=--once-per)`` with ``lock(timeout=--timeout)``: the job appends this pid to
    ``--journal`` and the worker prints ``ran <pid>``; a run skipped because its period's run
    happened prints ``skipped <period index> <pid of the run that used it>``. With
    ``ISOLATABLE_TEST_CLOCK_OFFSET=SECONDS`` in the environment this process's wall clock is that
    far off (``time.time()`` and the holder records' ``datetime.now()``), as a host's with a
    wrong clock is.
``fork-holder``
    Take the lock, fork one child that calls ``guard.release()`` and leaves with ``os._exit``
    and one that drops its copy of the guard (its finalizer runs) and leaves with ``sys.exit``;
    print ``children <exit code> <exit code>``, keep the lock until told.
``fenced-write``
    Take the lock at once, print ``held <pid> <fencing token>``, wait for a line, then in one
    ``transaction.atomic(using=--database)`` insert a row with this pid into ``--table`` and
    ``fence()`` the guard: ``committed``, or ``lost <the newer token>`` (rolled back).
``take``
    Print ``ready``; then for each ``try`` line on stdin, ``try_lock`` and release at once,
    printing ``took <pid>`` or ``busy <holder pid>``; leave on any other line (or EOF).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import NoReturn

import django


def fake_clock(offset: float) -> None:
    """Set this process's wall clock ``offset`` seconds off: ``time.time()``,
    ``time.time_ns()`` and the ``datetime.now()`` of holder records (as
    tests/test_faults.py fakes a holder's clock). Monotonic clocks, the kernel's and the
    servers' clocks are left alone."""
    real_time, real_time_ns = time.time, time.time_ns
    time.time = lambda: real_time() + offset
    time.time_ns = lambda: real_time_ns() + int(offset * 1e9)

    class WrongClock(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def, override]
            return datetime.now(tz) + timedelta(seconds=offset)

    from django_isolatable import holders

    holders.datetime = WrongClock  # type: ignore[misc]


django.setup()

if os.environ.get("ISOLATABLE_TEST_CLOCK_OFFSET"):
    fake_clock(float(os.environ["ISOLATABLE_TEST_CLOCK_OFFSET"]))

from django_isolatable import (  # noqa: E402
    AlreadyRan,
    AlreadyRunning,
    CommandIsolation,
    LockGuard,
    LockTimeout,
)


def report(*words: object) -> None:
    """One event line on stdout, flushed at once (the test reads it through a pipe)."""
    print(*words, flush=True)


def await_line() -> str:
    """Block until the test sends a line (or closes stdin)."""
    return sys.stdin.readline().strip()


def isolation_of(args: argparse.Namespace) -> CommandIsolation:
    return CommandIsolation(args.name, lock_dir=args.lock_dir)


def count(args: argparse.Namespace) -> None:
    isolation = isolation_of(args)
    counter = Path(args.counter)
    intervals: list[tuple[float, float]] = []
    report("ready")
    if await_line() != "go":
        raise SystemExit("expected 'go' on stdin")
    for _ in range(args.iterations):
        with isolation.lock(timeout=args.timeout):
            start = time.monotonic()
            increment_non_atomically(counter)
            if args.hold:
                time.sleep(args.hold)  # simulated work, to keep the others waiting
            end = time.monotonic()
            if args.unlink_before_release:
                # The hazard the inode check exists for: the file disappears under waiters
                # that may already have it open (a person deleting it, or another library
                # that unlinks on release). FileNotFoundError here means that another process
                # held the lock at the same time and deleted the file first.
                os.unlink(isolation.lock_path())
        intervals.append((start, end))
    pid = os.getpid()
    Path(args.journal).write_text("".join(f"{pid} {s!r} {e!r}\n" for s, e in intervals))
    report("done")


def increment_non_atomically(counter: Path) -> None:
    """Read the integer, yield the CPU, write it back plus one: loses updates unless isolated."""
    with open(counter, "r+") as file:
        value = int(file.read())
        os.sched_yield()
        file.seek(0)
        file.truncate()
        file.write(str(value + 1))


def hold(args: argparse.Namespace) -> None:
    isolation = CommandIsolation(args.name, lock_dir=args.lock_dir, max_holders=args.max_holders)
    guard = isolation.try_lock(shared=args.shared)
    report("held", os.getpid(), guard.info.token)
    while await_line() == "lost?":
        report("lost", guard.lost)
    guard.release()
    report("released")


def fenced_write(args: argparse.Namespace) -> None:
    from django.db import connections, transaction

    from django_isolatable import LockLost, fence

    guard = isolation_of(args).try_lock()
    report("held", os.getpid(), guard.fencing_token)
    await_line()
    try:
        with transaction.atomic(using=args.database):
            with connections[args.database].cursor() as cursor:
                cursor.execute(f"INSERT INTO {args.table} (pid) VALUES (%s)", [os.getpid()])
            fence(guard, using=args.database)
    except LockLost as e:
        report("lost", e.newer_fencing_token)
    else:
        report("committed")
    guard.release()
    report("released")


def take(args: argparse.Namespace) -> None:
    isolation = isolation_of(args)
    report("ready")
    while await_line() == "try":
        try:
            isolation.try_lock().release()
        except AlreadyRunning as error:
            report("busy", error.holder.pid if error.holder is not None else None)
        else:
            report("took", os.getpid())


def wait(args: argparse.Namespace) -> None:
    reported: list[bool] = []

    def progress(waited: float, holder: object) -> None:
        if not reported:
            reported.append(True)
            report("waiting")

    try:
        guard = isolation_of(args).lock(timeout=args.timeout, progress=progress)
    except LockTimeout:
        report("timeout")
        return
    report("acquired", repr(time.monotonic()), os.getpid(), guard.info.token)
    await_line()
    guard.release()
    report("released")


def isolated_call(args: argparse.Namespace) -> None:
    from django_isolatable import isolated

    @isolated(args.name, label="job for worker {who}")
    def job(who: int, journal: str) -> str:
        with open(journal, "a") as file:
            file.write(f"{os.getpid()}\n")
        report("called", "ran")
        await_line()
        return "done"

    report("ready")
    if await_line() != "go":
        raise SystemExit("expected 'go' on stdin")
    result = job(args.who, args.journal)
    if result is None:
        report("called", "skipped")
    report("returned", result)


def once(args: argparse.Namespace) -> None:
    isolation = CommandIsolation(args.name, lock_dir=args.lock_dir, once_per=args.once_per)
    report("ready")
    if await_line() != "go":
        raise SystemExit("expected 'go' on stdin")
    try:
        with isolation.lock(timeout=args.timeout):
            with open(args.journal, "a") as journal:
                journal.write(f"{os.getpid()}\n")
            report("ran", os.getpid())
    except AlreadyRan as e:
        report("skipped", e.period_index, None if e.holder is None else e.holder.pid)


def fork_holder(args: argparse.Namespace) -> None:
    # Kept in a list, not a local, so the second child can drop the last reference to it.
    guards = [isolation_of(args).try_lock()]
    report("held", os.getpid(), guards[0].info.token)
    releasing_child = fork(lambda: release_and_exit(guards[0]))
    exiting_child = fork(lambda: drop_guard_and_exit(args, guards))
    codes = [
        os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in (releasing_child, exiting_child)
    ]
    report("children", *codes)
    await_line()
    guards[0].release()
    report("released")


def fork(child: Callable[[], NoReturn]) -> int:
    """Fork; the child runs ``child`` (which never returns), the parent gets the child's pid."""
    pid = os.fork()
    if pid == 0:
        child()
    return pid


def exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def release_and_exit(guard: LockGuard) -> NoReturn:
    """Child 1: release the inherited guard, then leave without running any finalizer."""
    try:
        guard.release()
    except BaseException:
        os._exit(1)
    os._exit(0)


def drop_guard_and_exit(args: argparse.Namespace, guards: list[LockGuard]) -> NoReturn:
    """Child 2: see the parent's lock as held, drop the guard (``__del__``), ``sys.exit``.

    Exit codes: 0 as expected, 3 the lock was not held, 4 the guard was not finalized.
    """
    try:
        isolation_of(args).try_lock()
    except AlreadyRunning:
        pass
    else:
        sys.exit(3)
    finalized = weakref.ref(guards[0])
    guards.clear()
    gc.collect()
    sys.exit(0 if finalized() is None else 4)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.workers")
    commands = parser.add_subparsers(dest="command", required=True)
    for command, function in [
        ("take", take),
        ("count", count),
        ("hold", hold),
        ("wait", wait),
        ("fork-holder", fork_holder),
        ("isolated-call", isolated_call),
        ("once", once),
        ("fenced-write", fenced_write),
    ]:
        sub = commands.add_parser(command)
        sub.set_defaults(function=function)
        sub.add_argument("name")
        sub.add_argument("lock_dir")
        if command == "count":
            sub.add_argument("--counter", required=True)
            sub.add_argument("--journal", required=True)
            sub.add_argument("--iterations", type=int, default=200)
            sub.add_argument("--hold", type=float, default=0.0)
            sub.add_argument("--timeout", type=float, default=60.0)
            sub.add_argument("--unlink-before-release", action="store_true")
        if command == "isolated-call":
            sub.add_argument("--journal", required=True)
            sub.add_argument("--who", type=int, required=True)
        if command == "hold":
            sub.add_argument("--max-holders", type=int, default=1)
            sub.add_argument("--shared", action="store_true")
        if command == "wait":
            sub.add_argument("--timeout", type=float, default=30.0)
        if command == "fenced-write":
            sub.add_argument("--database", required=True)
            sub.add_argument("--table", required=True)
        if command == "once":
            sub.add_argument("--once-per", type=float, required=True)
            sub.add_argument("--journal", required=True)
            sub.add_argument("--timeout", type=float, default=30.0)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.function(args)


if __name__ == "__main__":
    main(sys.argv[1:])
