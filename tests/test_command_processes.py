"""Acceptance tests: real ``python manage.py ...`` processes of the example project.

Each test starts ``manage.py`` commands the way a cron job or a deploy hook would (the example
project's settings, the file strategy, a LOCK_DIR of the test's own so tests never share locks)
and checks what a person sees: exit statuses, the lines on stdout and stderr, ``locks status``
and ``locks release``. Children write their output to files, which the tests read; the tests
await events (a lock taken, a line printed, a process exited) by polling and never sleep to let
something happen. Bounds are generous: they catch a hang, not slowness. Every process started
here is killed at the end of its test.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from django_isolatable import AlreadyRunning, CommandIsolation
from django_isolatable.holders import LockInfo
from tests.conformance_periods import wait_for_a_fresh_period

ROOT = Path(__file__).resolve().parent.parent
HOSTNAME = socket.gethostname()
EVENT_TIMEOUT = 10.0  # seconds to await an event; only a hang should ever hit it
STATUS_KEYS = {
    "name",
    "strategy",
    "state",
    "pid",
    "host",
    "started_at",
    "age_seconds",
    "command",
    "expires_at",
    "label",
    "mode",
    "fencing_token",
}


def skipped_line(name: str, pid: int) -> re.Pattern[str]:
    """The one stderr line of a run skipped because ``pid`` on this host holds ``name``."""
    return re.compile(
        rf"{re.escape(name)} is already running \(pid {pid} on {re.escape(HOSTNAME)} "
        r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); skipped\."
    )


def wait_until(condition: Callable[[], Any], what: str, timeout: float = EVENT_TIMEOUT) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that; fail after
    ``timeout`` seconds saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.01)


class ManagePy:
    """One running ``manage.py`` process; its stdout and stderr go to files in the test's
    tmp_path (no pipe can fill up, and output can be read while it runs)."""

    def __init__(self, args: tuple[str, ...], env: dict[str, str], log_dir: Path, **popen: Any):
        self.args = args
        log_dir.mkdir(exist_ok=True)
        number = len(list(log_dir.glob("*.stderr")))
        self.stdout_path = log_dir / f"{number}.stdout"
        self.stderr_path = log_dir / f"{number}.stderr"
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            popen.setdefault("stdout", stdout)
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", *args],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stderr=stderr,
                **popen,
            )
        self.pid = self.process.pid

    def __repr__(self) -> str:
        return f"<manage.py {' '.join(self.args)} pid={self.pid}>"

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def finish(self, timeout: float = EVENT_TIMEOUT) -> int:
        """Wait for the process to exit; its exit status (negative: killed by that signal)."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self} still runs after {timeout} s; stderr: {self.stderr!r}")

    def wait_for_output(self, text: str) -> None:
        """Wait until ``text`` appears on this process's stdout."""
        wait_until(
            lambda: text in self.stdout or self._exited_early(f"printing {text!r}"),
            f"{self} printing {text!r}",
        )

    def _exited_early(self, event: str) -> bool:
        if self.running:
            return False
        pytest.fail(
            f"{self} exited ({self.process.returncode}) before {event}; "
            f"stdout: {self.stdout!r}, stderr: {self.stderr!r}"
        )


Manage = Callable[..., ManagePy]


@pytest.fixture
def manage(lock_dir: Path, tmp_path: Path) -> Iterator[Manage]:
    """``manage(*args, env={...}, **popen_kwargs)`` starts ``python manage.py *args`` with the
    example project's settings and this test's LOCK_DIR; every process is killed at teardown."""
    base_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ISOLATABLE_", "DJANGO_")) and key != "LOG_LEVEL"
    }
    base_env.update(
        DJANGO_SETTINGS_MODULE="example_project.settings",
        ISOLATABLE_LOCK_DIR=str(lock_dir),
        ISOLATABLE_STRATEGY="file",
        PYTHONUNBUFFERED="1",  # output lines reach the files as they are written
    )
    started: list[ManagePy] = []

    def start(*args: str, env: dict[str, str] | None = None, **popen: Any) -> ManagePy:
        run = ManagePy(args, {**base_env, **(env or {})}, tmp_path / "manage", **popen)
        started.append(run)
        return run

    yield start
    for run in started:
        if run.running:
            run.process.kill()
        run.process.wait()


def isolation(name: str, lock_dir: Path) -> CommandIsolation:
    """The lock ``name`` as the children see it, from the test process."""
    return CommandIsolation(name, lock_dir=lock_dir)


def wait_for_holder(run: ManagePy, name: str, lock_dir: Path) -> LockInfo:
    """Wait until ``run`` holds the lock ``name``; return its record.

    Polls the lock file's JSON record (the documented ``cat``-able format) with plain reads, so
    the polling can never disturb the child while it takes the lock.
    """
    lock = isolation(name, lock_dir)
    path = lock.lock_path()
    assert path is not None

    def recorded_pid() -> int | None:
        try:
            return json.loads(path.read_bytes())["pid"]
        except (FileNotFoundError, ValueError, KeyError):  # not yet created, or being written
            return None

    wait_until(
        lambda: recorded_pid() == run.pid or run._exited_early(f"taking the lock {name}"),
        f"{run} taking the lock {name}",
    )
    holder = lock.holder()
    assert holder is not None
    assert (holder.pid, holder.alive) == (run.pid, True)
    return holder


def status_rows(run: ManagePy) -> dict[str, list[str]]:
    """The rows of a finished ``locks status`` table by lock name: [state, pid, host, ...]."""
    assert run.finish() == 0, run.stderr
    header, *rows = run.stdout.splitlines()
    assert header.split() == ["NAME", "STATE", "PID", "HOST", "STARTED", "(UTC)", "AGE", "COMMAND"]
    return {name: rest for name, *rest in (row.split() for row in rows)}


def kill_holder(manage: Manage, lock_dir: Path, *args: str, name: str) -> int:
    """Start ``manage.py *args``, SIGKILL it once it holds ``name``; return its (dead) pid."""
    run = manage(*args)
    wait_for_holder(run, name, lock_dir)
    run.process.kill()
    assert run.finish() == -signal.SIGKILL
    return run.pid


# --- skipping a second copy --------------------------------------------------------------------


def test_second_copy_is_skipped_while_the_first_runs(manage, lock_dir):
    """A copy started while another runs exits at once with --isolated-exit-code, one stderr
    line naming the holder's pid, host and start time, and never reaches handle(); the first
    copy is not disturbed and finishes normally."""
    first = manage("import_data", "--seconds", "3")
    holder = wait_for_holder(first, "import_data", lock_dir)

    second = manage("import_data", "--seconds", "3", "--isolated-exit-code", "75")
    assert second.finish(timeout=5) == 75
    assert first.running

    [line] = second.stderr.splitlines()
    assert skipped_line("import_data", first.pid).fullmatch(line), line
    assert f"since {holder.acquired_at:%Y-%m-%d %H:%M:%S} UTC" in line
    assert second.stdout == ""  # not even "importing": handle() never ran

    assert first.finish() == 0, first.stderr
    assert first.stdout.splitlines() == [
        "import_data: importing for 3 s...",
        "import_data: done.",
        "import_data: cleanup ran.",
    ]
    assert first.stderr == ""


@pytest.mark.parametrize(
    ("options", "env", "status"),
    [
        pytest.param([], {}, 0, id="default-0"),
        pytest.param([], {"ISOLATABLE_SKIPPED_EXIT_CODE": "3"}, 3, id="setting"),
        pytest.param(["--isolated-exit-code", "75"], {}, 75, id="option"),
        pytest.param(
            ["--isolated-exit-code", "75"],
            {"ISOLATABLE_SKIPPED_EXIT_CODE": "3"},
            75,
            id="option-over-setting",
        ),
    ],
)
def test_exit_status_of_a_skipped_run(manage, lock_dir, options, env, status):
    """A skipped run exits 0 by default, SKIPPED_EXIT_CODE when the settings give one, and
    --isolated-exit-code above both. (The holder is this test process: any process counts.)"""
    with isolation("import_data", lock_dir).try_lock():
        skipped = manage("import_data", "--seconds", "0", *options, env=env)
        assert skipped.finish() == status, skipped.stderr
    assert skipped_line("import_data", os.getpid()).fullmatch(skipped.stderr.rstrip("\n"))
    assert skipped.stdout == ""


# --- waiting -----------------------------------------------------------------------------------


def test_wait_runs_after_the_first_copy_ends(manage, lock_dir, tmp_path):
    """With --wait a second copy waits instead of skipping (saying whom it waits for), starts
    handle() promptly once the first copy's handle() is over, never overlapping it, and exits 0."""
    with open(tmp_path / "both.stdout", "ab") as shared:  # O_APPEND: lines in true write order
        first = manage("import_data", "--seconds", "3", stdout=shared)
        wait_for_holder(first, "import_data", lock_dir)
        second = manage("import_data", "--seconds", "0.5", "--wait", "30", stdout=shared)

    def output() -> list[str]:
        return (tmp_path / "both.stdout").read_text().splitlines()

    assert first.finish() == 0, first.stderr
    first_exited = time.monotonic()
    wait_until(lambda: "import_data: importing for 0.5 s..." in output(), "second copy starting")
    # Usually the second copy has started before the first has even exited (the lock goes at
    # the end of handle(), the interpreter shuts down after). A second is 40 times the file
    # strategy's poll interval: only a wake-up that does not work misses it.
    handoff = time.monotonic() - first_exited
    assert handoff < 1.0

    assert second.finish() == 0, second.stderr
    assert output() == [
        "import_data: importing for 3 s...",
        "import_data: done.",
        "import_data: cleanup ran.",
        "import_data: importing for 0.5 s...",
        "import_data: done.",
        "import_data: cleanup ran.",
    ]
    assert f"Waiting for import_data (pid {first.pid} on {HOSTNAME} since " in second.stderr
    assert "skipped" not in second.stderr


def test_wait_that_times_out_exits_1(manage, lock_dir):
    """--wait SECONDS gives up after that long against a holder that keeps the lock: exit
    status 1 and a message saying why; handle() never runs."""
    with isolation("import_data", lock_dir).try_lock():
        waiter = manage("import_data", "--seconds", "0", "--wait", "0.5")
        assert waiter.finish() == 1
    assert (
        f"Gave up waiting for import_data after 0.5 s: it is still running "
        f"(pid {os.getpid()} on {HOSTNAME} since "
    ) in waiter.stderr
    assert waiter.stdout == ""


# --- signals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name
)
def test_signal_unwinds_the_command_and_releases_the_lock(manage, lock_dir, signum):
    """SIGTERM, SIGINT and SIGHUP during handle() unwind it: its finally block runs, stderr says
    it was interrupted and the lock released, the exit status is 128 + signal, and the lock is
    free at once (no stale record left behind)."""
    run = manage("import_data", "--seconds", "60")
    run.wait_for_output("import_data: importing for 60 s...")

    run.process.send_signal(signum)
    assert run.finish(timeout=5) == 128 + signum

    assert run.stdout.splitlines() == [
        "import_data: importing for 60 s...",
        "import_data: cleanup ran.",
    ]
    assert run.stderr.splitlines() == [
        f"import_data interrupted by {signal.Signals(signum).name}; stopped, its lock is released."
    ]
    lock = isolation("import_data", lock_dir)
    assert lock.holder() is None
    with lock.try_lock():
        pass


# --- locks status / locks release --------------------------------------------------------------


def test_sigkilled_holder_shows_as_stale_and_release_clears_it(manage, lock_dir):
    """A SIGKILLed command leaves its record: ``locks status`` shows it stale with the dead pid,
    as a table and as JSON with exactly the documented keys; ``locks release NAME`` (no --force)
    clears it, and releasing it again says it is not locked."""
    dead_pid = kill_holder(manage, lock_dir, "import_data", "--seconds", "60", name="import_data")

    rows = status_rows(manage("locks", "status"))
    assert list(rows) == ["import_data"]
    assert rows["import_data"][:3] == ["stale", str(dead_pid), HOSTNAME]

    as_json = manage("locks", "status", "--json")
    assert as_json.finish() == 0, as_json.stderr
    [entry] = json.loads(as_json.stdout)
    assert set(entry) == STATUS_KEYS
    assert entry["name"] == "import_data"
    assert entry["strategy"] == "file"
    assert entry["state"] == "stale"
    assert entry["pid"] == dead_pid
    assert entry["host"] == HOSTNAME
    assert datetime.fromisoformat(entry["started_at"]).utcoffset().total_seconds() == 0
    assert 0 <= entry["age_seconds"] < 60
    assert entry["command"] == "manage.py import_data --seconds 60"
    assert entry["expires_at"] is None

    release = manage("locks", "release", "import_data")
    assert release.finish() == 0, release.stderr
    assert release.stdout == f"Released stale lock import_data (pid {dead_pid} on {HOSTNAME}).\n"
    assert isolation("import_data", lock_dir).holder() is None
    assert status_rows(manage("locks", "status", "import_data"))["import_data"][0] == "free"

    again = manage("locks", "release", "import_data")
    assert again.finish() == 0, again.stderr
    assert again.stdout == "import_data is not locked.\n"


def test_release_refuses_a_live_holder_unless_forced(manage, lock_dir):
    """``locks release NAME`` refuses a live holder (exit 1, naming its pid and host and
    suggesting --force) and leaves it running with its lock; with --force it exits 0 and, for
    the file strategy, removes the lock file so a new run starts while the old one runs on."""
    holder = manage("import_data", "--seconds", "60")
    wait_for_holder(holder, "import_data", lock_dir)
    lock = isolation("import_data", lock_dir)

    refused = manage("locks", "release", "import_data")
    assert refused.finish() == 1
    assert f"pid {holder.pid} on {HOSTNAME}" in refused.stderr
    assert "--force" in refused.stderr
    assert refused.stdout == ""
    assert holder.running
    assert lock.holder().pid == holder.pid
    with pytest.raises(AlreadyRunning):
        lock.try_lock()

    forced = manage("locks", "release", "--force", "import_data")
    assert forced.finish() == 0, forced.stderr
    assert f"Force-released import_data (pid {holder.pid} on {HOSTNAME})" in forced.stdout
    with lock.try_lock() as guard:
        assert guard.info.pid == os.getpid()
        assert holder.running


@pytest.fixture
def stale_and_live(manage, lock_dir) -> tuple[int, ManagePy]:
    """Two locks: ``import_data`` left stale by a SIGKILLed run (its pid is returned) and
    ``tenant_report:acme`` held by a live run."""
    live = manage("tenant_report", "acme", "--seconds", "60")
    dead_pid = kill_holder(manage, lock_dir, "import_data", "--seconds", "60", name="import_data")
    wait_for_holder(live, "tenant_report:acme", lock_dir)
    return dead_pid, live


def test_release_stale_releases_only_stale_locks(manage, lock_dir, stale_and_live):
    """``locks release --stale`` clears the dead holder's lock and leaves the live one alone."""
    dead_pid, live = stale_and_live

    release = manage("locks", "release", "--stale")
    assert release.finish() == 0, release.stderr
    assert release.stdout == f"Released stale lock import_data (pid {dead_pid} on {HOSTNAME}).\n"

    assert isolation("import_data", lock_dir).holder() is None
    assert isolation("tenant_report:acme", lock_dir).holder().pid == live.pid
    rows = status_rows(manage("locks", "status"))
    assert list(rows) == ["tenant_report:acme"]
    assert rows["tenant_report:acme"][:2] == ["held", str(live.pid)]


def test_release_all_needs_force(manage, lock_dir, stale_and_live):
    """``locks release --all`` alone refuses with a message that says to add --force and
    touches nothing; ``--all --force`` releases the stale lock and the live one."""
    dead_pid, live = stale_and_live

    refused = manage("locks", "release", "--all")
    assert refused.finish() != 0
    assert "--all" in refused.stderr
    assert "--force" in refused.stderr
    rows = status_rows(manage("locks", "status"))
    assert {name: row[:2] for name, row in rows.items()} == {
        "import_data": ["stale", str(dead_pid)],
        "tenant_report:acme": ["held", str(live.pid)],
    }

    forced = manage("locks", "release", "--all", "--force")
    assert forced.finish() == 0, forced.stderr
    assert f"Released stale lock import_data (pid {dead_pid} on {HOSTNAME})." in forced.stdout
    assert (
        f"Force-released tenant_report:acme (pid {live.pid} on {HOSTNAME}); "
        "if that process still runs" in forced.stdout
    )
    assert isolation("import_data", lock_dir).holder() is None
    assert isolation("tenant_report:acme", lock_dir).holder() is None
    assert live.running  # --force frees the lock; it does not stop the holder


# --- per-argument isolation --------------------------------------------------------------------


def test_each_tenant_has_its_own_lock(manage, lock_dir):
    """``get_isolation_id`` through the CLI: ``tenant_report acme`` and ``tenant_report globex``
    run side by side, a second ``tenant_report acme`` is skipped, and ``locks status`` shows the
    lock as ``tenant_report:acme``."""
    acme = manage("tenant_report", "acme", "--seconds", "6")
    wait_for_holder(acme, "tenant_report:acme", lock_dir)

    globex = manage("tenant_report", "globex", "--seconds", "0")
    second_acme = manage("tenant_report", "acme", "--seconds", "0")
    assert globex.finish() == 0, globex.stderr
    assert globex.stdout == "Report for globex built.\n"
    assert globex.stderr == ""
    assert second_acme.finish() == 0
    assert second_acme.stdout == ""
    assert skipped_line("tenant_report:acme", acme.pid).fullmatch(second_acme.stderr.rstrip())

    rows = status_rows(manage("locks", "status"))
    assert acme.running, "the first acme report should still run: the others ran beside it"
    assert list(rows) == ["tenant_report:acme"]
    assert rows["tenant_report:acme"][:2] == ["held", str(acme.pid)]

    assert acme.finish() == 0, acme.stderr
    assert acme.stdout == "Report for acme built.\n"


# --- output options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "env", "status"),
    [
        pytest.param([], {"ISOLATABLE_SKIPPED_EXIT_CODE": "3"}, 3, id="setting"),
        pytest.param(["--isolated-exit-code", "75"], {}, 75, id="option"),
    ],
)
def test_verbosity_0_skips_silently(manage, lock_dir, options, env, status):
    """At --verbosity 0 a skipped run prints nothing at all and still exits with the
    configured status."""
    with isolation("import_data", lock_dir).try_lock():
        skipped = manage("import_data", "--verbosity", "0", *options, env=env)
        assert skipped.finish() == status
    assert skipped.stdout == ""
    assert skipped.stderr == ""


@pytest.mark.parametrize(
    ("options", "colored"),
    [pytest.param([], True, id="default"), pytest.param(["--no-color"], False, id="no-color")],
)
def test_no_color_on_a_terminal(manage, lock_dir, options, colored):
    """On a terminal the skipped line is styled; with --no-color it is the plain line."""
    terminal, child_end = pty.openpty()  # Django styles output when stdout is a terminal
    try:
        with isolation("import_data", lock_dir).try_lock():
            skipped = manage("import_data", *options, stdout=child_end)
            assert skipped.finish() == 0, skipped.stderr
    finally:
        os.close(child_end)
        os.close(terminal)
    line = skipped.stderr.rstrip("\n")
    assert ("\x1b[" in line) is colored, repr(line)
    if not colored:
        assert skipped_line("import_data", os.getpid()).fullmatch(line), repr(line)


# --- monitoring while runs start --------------------------------------------------------------

MONITOR = """\
from django_isolatable import CommandIsolation
lock = CommandIsolation("import_data")
print("monitoring", flush=True)
while True:
    lock.is_locked()
"""


@pytest.mark.parametrize(
    "leftover", [pytest.param("none", id="free"), pytest.param("dead holder", id="stale")]
)
def test_monitoring_never_makes_a_free_lock_look_held(manage, lock_dir, leftover):
    """Looking at a lock (``locks status``, ``is_locked()``) never makes a run that takes it at
    that instant fail: with nothing else running, taking the lock always succeeds, whether the
    lock file is empty or still holds a dead holder's record. Two ``manage.py shell`` monitors
    look at the lock in a loop while this process takes and releases it many times."""
    lock = isolation("import_data", lock_dir)
    if leftover == "dead holder":
        kill_holder(manage, lock_dir, "import_data", "--seconds", "60", name="import_data")
    else:
        lock.try_lock().release()
    left_behind = lock.lock_path().read_bytes()
    monitors = [manage("shell", "-c", MONITOR) for _ in range(2)]
    for monitor in monitors:
        monitor.wait_for_output("monitoring")
    deadline = time.monotonic() + 4
    attempts = 0
    while time.monotonic() < deadline and attempts < 3000:
        attempts += 1
        lock.lock_path().write_bytes(left_behind)  # an empty file, or the dead holder's record
        time.sleep(0.001)  # it stays so for a moment, as between two cron runs
        try:
            lock.try_lock().release()
        except AlreadyRunning as e:
            pytest.fail(f"attempt {attempts} on a lock nobody holds: {e}")


# --- once per period ---------------------------------------------------------------------------


def test_once_per_from_the_cli_skips_a_second_run_in_the_period(manage, lock_dir):
    """``--once-per 3600``: the first run of the hour runs; a second exits with the skip's
    status, one stderr line naming the run that used the period, and never reaches handle()."""
    backend = isolation("import_data", lock_dir).backend
    wait_for_a_fresh_period(backend, 3600, needed=30)  # both runs fall in one hour
    first = manage("import_data", "--seconds", "0", "--once-per", "3600")
    assert first.finish() == 0, first.stderr
    assert "import_data: done." in first.stdout
    second = manage("import_data", "--seconds", "0", "--once-per", "3600",
                    "--isolated-exit-code", "75")  # fmt: skip
    assert second.finish() == 75, second.stderr
    [line] = second.stderr.splitlines()
    assert re.fullmatch(
        rf"import_data already ran in this period \(pid {first.pid} on {re.escape(HOSTNAME)} "
        r"at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); skipped\.",
        line,
    ), line
    assert second.stdout == ""
    assert not isolation("import_data", lock_dir).is_locked()


def test_a_bad_once_per_from_the_cli_is_a_usage_error(manage):
    run = manage("import_data", "--seconds", "0", "--once-per", "0")
    assert run.finish() == 2
    assert "error: argument --once-per: expected seconds > 0, got '0'" in run.stderr
    assert run.stdout == ""


# --- a semaphore: isolation_max_holders ----------------------------------------------------------


def test_a_command_with_max_holders_runs_that_many_copies_and_skips_one_more(manage, lock_dir):
    """resize_images allows two runs at once: two copies run together, a third is skipped with
    one line saying the limit is reached, ``locks status`` shows both holders, and a SIGKILLed
    holder's slot is free again at once."""
    lock = CommandIsolation("resize_images", lock_dir=lock_dir, max_holders=2)
    first = manage("resize_images", "--seconds", "30")
    second = manage("resize_images", "--seconds", "30")
    wait_until(
        lambda: {h.pid for h in lock.holders()} == {first.pid, second.pid},
        "both copies holding a slot",
    )
    third = manage("resize_images", "--seconds", "1", "--isolated-exit-code", "75")
    assert third.finish() == 75
    [line] = third.stderr.splitlines()
    assert line.startswith("resize_images is already running 2 times at once, its limit (one is ")
    assert third.stdout == ""

    status = manage("locks", "status", "--json")
    assert status.finish() == 0, status.stderr
    rows = json.loads(status.stdout)
    assert sorted((r["pid"], r["mode"], r["state"]) for r in rows) == sorted(
        [(first.pid, "semaphore", "held"), (second.pid, "semaphore", "held")]
    )

    first.process.kill()
    assert first.finish() == -signal.SIGKILL
    fourth = manage("resize_images", "--seconds", "0")
    assert fourth.finish() == 0, fourth.stderr
    assert "resize_images: done." in fourth.stdout
    second.process.kill()
    second.finish()
