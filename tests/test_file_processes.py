"""The file strategy between real processes and threads: exclusion, crashes, forks, handoff.

Every test here runs real processes (``tests/workers.py``) or real threads against real lock
files; nothing is mocked. Workers report events on stdout, so the tests await events and never
sleep to let something happen. Time bounds are generous on purpose: they catch a lock that
hangs, not one that is slow (speed is the benchmarks' job).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from django_isolatable import AlreadyRunning, CommandIsolation, LockTimeout
from django_isolatable.backends import inotify
from django_isolatable.backends.base import BackendOptions, Waiting
from django_isolatable.backends.file import FileBackend
from django_isolatable.holders import is_alive, new_record, process_started_at
from tests.processes import (
    EVENT_TIMEOUT,
    Worker,
    Workers,
    assert_exclusive_counting,
    run_counting_workers,
)

NAME = "import_data"


@pytest.fixture
def spawn(lock_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """``spawn(command, *options)`` starts a worker on ``NAME`` in this test's LOCK_DIR.

    Every worker still running at the end of the test is killed.
    """
    workers = Workers(tmp_path, NAME, lock_dir)
    yield workers.start
    workers.close()


def record_in(path: Path) -> dict:
    return json.loads(path.read_text())


def test_eight_processes_count_exactly(spawn, tmp_path):
    """8 processes x 200 racy increments inside the lock lose no update and never overlap."""
    journals = run_counting_workers(spawn, tmp_path, 8, "--iterations", "200")
    assert_exclusive_counting(journals, tmp_path / "counter", 1600)


def test_sigkilled_holder_frees_the_lock_for_a_waiter(spawn):
    """A holder killed with SIGKILL frees the lock at once: the kernel drops its flock."""
    holder = spawn("hold")
    holder.expect("held")
    waiter = spawn("wait", "--timeout", "30")
    waiter.expect("waiting")  # blocked in lock(timeout=30) behind the holder
    killed_at = time.monotonic()
    holder.kill()
    acquired_at, waiter_pid, _token = waiter.expect("acquired")
    assert float(acquired_at) - killed_at < 2.0
    assert CommandIsolation(NAME).holder().pid == int(waiter_pid) == waiter.pid
    waiter.finish()


def test_leftover_record_of_a_sigkilled_holder(spawn):
    """After SIGKILL the record stays (alive=False, the dead pid) but the lock is free."""
    holder = spawn("hold")
    pid, token = holder.expect("held")
    holder.kill()
    isolation = CommandIsolation(NAME)

    leftover = isolation.holder()
    assert leftover is not None
    assert (leftover.pid, leftover.token, leftover.alive) == (int(pid), token, False)
    assert isolation.is_locked() is False
    with isolation.try_lock() as guard:
        assert guard.info.pid == os.getpid()
        assert record_in(isolation.lock_path())["pid"] == os.getpid()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process other than this one."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_pid_reuse_is_judged_by_start_time(sleeper, lock_dir):
    """A live pid whose start time differs from the record's is a reused pid: not the holder.

    ``holder()`` on a free file lock always says alive=False (the kernel is the truth for this
    strategy), so the psutil judgement is checked with ``is_alive`` on the same records too.
    """
    isolation = CommandIsolation(NAME)
    path = isolation.lock_path()
    lock_dir.mkdir(parents=True, exist_ok=True)
    real_start = process_started_at(sleeper.pid)
    live = dataclasses.replace(
        new_record(NAME, "file"), pid=sleeper.pid, process_started_at=real_start, alive=None
    )
    reused = dataclasses.replace(live, process_started_at=real_start - timedelta(hours=1))
    elsewhere = dataclasses.replace(live, host_id="boot=another-host pid:[1]")

    for record, judgement in [(reused, False), (live, True), (elsewhere, None)]:
        path.write_text(record.to_json())
        leftover = isolation.holder()
        assert leftover is not None
        assert (leftover.pid, leftover.token) == (sleeper.pid, record.token)
        assert leftover.alive is False, "a free file lock's record is stale, whoever it names"
        assert isolation.is_locked() is False
        assert is_alive(leftover) is judgement, record

    sleeper.kill()
    sleeper.wait(EVENT_TIMEOUT)
    assert is_alive(live) is False  # the process is gone (and reaped) now


def test_many_processes_hand_the_lock_around_without_overlap(spawn, tmp_path, lock_dir):
    """6 processes take and release one lock with short holds while the others wait.

    Lock files are never unlinked on release, so the unlink race cannot happen: the journal
    shows one holder at a time, and the lock file keeps its inode throughout.
    """
    with CommandIsolation(NAME).lock():
        pass  # create the lock file, to compare its inode afterwards
    path = CommandIsolation(NAME).lock_path()
    inode = path.stat().st_ino
    journals = run_counting_workers(
        spawn, tmp_path, 6, "--iterations", "150", "--hold", "0.0002", "--timeout", "30"
    )
    assert_exclusive_counting(journals, tmp_path / "counter", 900)
    assert path.stat().st_ino == inode


def test_holders_deleting_the_lock_file_never_let_two_in(spawn, tmp_path):
    """Each holder deletes the lock file just before releasing, under waiters that have it open.

    A waiter that opened the file before the deletion and gets its flock after the release must
    notice (the inode check after flock) and lock the new file instead; otherwise it would hold
    the deleted file while another process holds the new one. The window is microseconds wide,
    so a run meets it only a few times: without the inode check this test fails in about half
    of its runs, not every time.
    """
    journals = run_counting_workers(
        spawn, tmp_path, 6, "--iterations", "100", "--timeout", "30", "--unlink-before-release"
    )
    assert_exclusive_counting(journals, tmp_path / "counter", 600)


def test_lock_file_deleted_by_hand_while_a_waiter_waits(spawn):
    """Deleting a held lock file by hand force-releases it: the waiter recreates the file.

    This is what ``release_all()`` does to a live holder. The old holder runs on with the
    deleted file; its release later must not touch the new holder's record.
    """
    isolation = CommandIsolation(NAME)
    path = isolation.lock_path()
    old_holder = spawn("hold")
    old_holder.expect("held")
    old_inode = path.stat().st_ino
    waiter = spawn("wait", "--timeout", "30")
    waiter.expect("waiting")

    deleted_at = time.monotonic()
    path.unlink()
    acquired_at, waiter_pid, waiter_token = waiter.expect("acquired")
    assert float(acquired_at) - deleted_at < 2.0
    assert path.stat().st_ino != old_inode

    old_holder.finish()
    assert old_holder.expect("released") == []
    assert record_in(path)["token"] == waiter_token
    with pytest.raises(AlreadyRunning) as caught:
        isolation.try_lock()
    assert caught.value.holder.pid == int(waiter_pid)
    waiter.finish()


def test_handoff_to_a_blocked_waiter_is_prompt(spawn):
    """A waiter blocked in lock(timeout=10) gets the lock right after the holder releases."""
    guard = CommandIsolation(NAME).lock()
    waiter = spawn("wait", "--timeout", "10")
    waiter.expect("waiting")
    released_at = time.monotonic()
    guard.release()
    acquired_at, _pid, _token = waiter.expect("acquired")
    latency = float(acquired_at) - released_at
    print(f"handoff latency: {latency * 1000:.2f} ms")
    assert latency < 1.0
    waiter.finish()


def test_forked_children_never_release_the_parents_lock(spawn):
    """Children of a holder, releasing the guard or finalizing it, leave the parent's lock held.

    One child calls ``guard.release()`` and leaves with ``os._exit``; the other drops the guard
    (``__del__`` runs) and leaves with ``sys.exit``. The parent still holds the lock afterwards
    and the lock file still holds its record.
    """
    parent = spawn("fork-holder")
    pid, token = parent.expect("held")
    assert parent.expect("children") == ["0", "0"]

    isolation = CommandIsolation(NAME)
    with pytest.raises(AlreadyRunning) as caught:
        isolation.try_lock()
    assert caught.value.holder.pid == int(pid)
    record = record_in(isolation.lock_path())
    assert (record["pid"], record["token"]) == (int(pid), token)
    parent.finish()
    with isolation.try_lock():
        pass


def test_lock_descriptor_is_not_inherited_across_exec(tmp_path):
    """A program the holder runs (even with close_fds=False) inherits no lock descriptor.

    The lock file is opened with O_CLOEXEC; a control descriptor made inheritable on purpose
    shows that the listing would reveal an inherited one.
    """
    isolation = CommandIsolation(NAME)
    control = tmp_path / "control"
    control_fd = os.open(control, os.O_RDONLY | os.O_CREAT)
    os.set_inheritable(control_fd, True)
    try:
        with isolation.lock():
            listing = subprocess.run(
                ["ls", "-l", "/proc/self/fd"],
                close_fds=False,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
    finally:
        os.close(control_fd)
    assert os.path.realpath(control) in listing
    assert os.path.realpath(isolation.lock_path()) not in listing


def test_threads_exclude_each_other():
    """4 threads x 200 racy increments, each thread with its own CommandIsolation object."""
    counter = {"value": 0}
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def increment_repeatedly() -> None:
        isolation = CommandIsolation(NAME)
        start.wait()
        try:
            for _ in range(200):
                with isolation.lock(timeout=30):
                    value = counter["value"]
                    time.sleep(0)  # let another thread run in the middle of the update
                    counter["value"] = value + 1
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=increment_repeatedly) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(EVENT_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors
    assert counter["value"] == 800


def inotify_descriptors() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir itself used is gone
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
    return count


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux only")
def test_timed_out_waits_leave_no_descriptor_behind(spawn):
    """Waits that time out behind another process's lock must not leak inotify descriptors:
    a thread keeps at most one inotify instance, reused by all its waits."""
    holder = spawn("hold")
    holder.expect("held")
    before = inotify_descriptors()
    isolations = [CommandIsolation(NAME) for _ in range(3)]
    try:
        for isolation in isolations:
            with pytest.raises(LockTimeout):
                isolation.lock(timeout=0.05)
        gc.collect()
        assert inotify_descriptors() <= before + 1
    finally:
        for isolation in isolations:
            isolation.backend.close()
    holder.finish()


def file_backend(lock_dir: Path) -> FileBackend:
    return FileBackend(BackendOptions(lock_dir=lock_dir, ttl=60))


class TestAcquireWaiting:
    """The file strategy's ``Waiting`` ability: one call that waits for another process's
    release and takes the lock, or gives up after its timeout holding nothing."""

    def test_it_takes_the_lock_when_the_holder_releases(self, spawn, lock_dir):
        holder = spawn("hold")
        holder.expect("held")
        backend = file_backend(lock_dir)
        record = new_record(NAME, "file")
        taken: list[object] = []
        waiter = threading.Thread(
            target=lambda: taken.append(backend.acquire_waiting(NAME, record, EVENT_TIMEOUT))
        )
        waiter.start()
        holder.finish()
        waiter.join(EVENT_TIMEOUT)
        (lease,) = taken
        assert lease is not None
        assert record_in(backend.lock_path(NAME))["token"] == record.token
        assert backend.release(lease)

    def test_without_inotify_it_polls(self, spawn, lock_dir, monkeypatch):
        monkeypatch.setattr(inotify, "_libc", None)
        holder = spawn("hold")
        holder.expect("held")
        backend = file_backend(lock_dir)
        taken: list[object] = []
        waiter = threading.Thread(  # a new thread: no inotify instance of its own yet
            target=lambda: taken.append(
                backend.acquire_waiting(NAME, new_record(NAME, "file"), EVENT_TIMEOUT)
            )
        )
        waiter.start()
        holder.finish()
        waiter.join(EVENT_TIMEOUT)
        (lease,) = taken
        assert lease is not None
        assert backend.release(lease)

    def test_a_timeout_returns_none_holding_nothing(self, spawn, lock_dir):
        holder = spawn("hold")
        holder.expect("held")
        backend = file_backend(lock_dir)
        started = time.monotonic()
        assert backend.acquire_waiting(NAME, new_record(NAME, "file"), 0.2) is None
        assert 0.2 <= time.monotonic() - started < 5.0
        holder.finish()
        lease = backend.acquire(NAME, new_record(NAME, "file"))  # no claim of ours in the way
        assert lease is not None
        assert backend.release(lease)

    def test_an_interrupt_mid_wait_leaves_nothing_held(self, spawn, lock_dir):
        holder = spawn("hold")
        holder.expect("held")
        backend = file_backend(lock_dir)

        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGALRM, interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            with pytest.raises(KeyboardInterrupt):
                backend.acquire_waiting(NAME, new_record(NAME, "file"), EVENT_TIMEOUT)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        holder.finish()
        other = spawn("hold")  # another process takes it: nothing of this one's is in the way
        other.expect("held")
        other.finish()
        lease = backend.acquire(NAME, new_record(NAME, "file"))  # nor a claim in this process
        assert lease is not None
        assert backend.release(lease)

    def test_the_engine_waits_through_it(self, spawn):
        """lock(timeout=...) on the file strategy blocks in acquire_waiting, not in a poll."""
        assert isinstance(CommandIsolation(NAME).backend, Waiting)
        holder = spawn("hold")
        holder.expect("held")
        with pytest.raises(LockTimeout):
            CommandIsolation(NAME).lock(timeout=0.1)
        holder.finish()


def test_a_lock_dir_replaced_under_a_running_process_is_followed(spawn, lock_dir, tmp_path):
    """A deploy that moves LOCK_DIR aside and makes a new one: a process that checked the old
    one reports and takes the locks of the new one (each open checks what the path names)."""
    backend = file_backend(lock_dir)
    lease = backend.acquire(NAME, new_record(NAME, "file"))
    assert lease is not None
    assert backend.release(lease)
    lock_dir.rename(tmp_path / "previous")
    lock_dir.mkdir(mode=0o700)
    holder = spawn("hold")
    pid, _token = holder.expect("held")
    info = (backend.inspect(NAME) or [None])[0]
    assert info is not None
    assert (info.pid, info.alive) == (int(pid), True)
    assert backend.acquire(NAME, new_record(NAME, "file")) is None
    holder.finish()
    lease = backend.acquire(NAME, new_record(NAME, "file"))
    assert lease is not None
    assert lease.path == str(lock_dir / f"{NAME}.lock")
    assert backend.release(lease)
