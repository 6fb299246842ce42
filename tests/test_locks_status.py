"""``locks status --older-than`` and ``--watch`` with real processes, a terminal and real
durations, and ``locks status`` streaming 10,000 locks."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from django_isolatable import CommandIsolation
from django_isolatable.listing import BATCH, age_limit
from tests.processes import Worker
from tests.test_locks_cli import ROOT, TIMEOUT, child_env, run_locks

MANY = 10_000


@pytest.fixture
def file_locks(settings, tmp_path) -> Path:
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o700)
    settings.ISOLATABLE = {"STRATEGY": "file", "LOCK_DIR": str(lock_dir)}
    return lock_dir


@pytest.fixture
def holder(file_locks, tmp_path) -> Iterator[Worker]:
    """A process holding ``nightly_report``."""
    worker = Worker(tmp_path / "holder.stderr", "hold", "nightly_report", str(file_locks))
    worker.expect("held")
    yield worker
    worker.close()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400), ("42", 42), ("0.5", 0.5)],
)
def test_durations_in_the_accepted_forms(value, seconds):
    assert age_limit(value) == seconds


@pytest.mark.parametrize("value", ["", "soon", "-5", "15 minutes", "1w", "m"])
def test_a_bad_duration_is_a_usage_error_naming_the_accepted_forms(file_locks, value):
    result = run_locks("status", "--older-than", value)
    assert result.returncode == 2
    assert "90s, 15m, 2h" in result.stderr
    assert "Traceback" not in result.stderr


def test_older_than_lists_only_holders_past_the_duration_and_exits_2(holder):
    young = run_locks("status", "--older-than", "1h")
    assert (young.returncode, young.stdout) == (
        0,
        "No locks held longer than 1h 00m (file strategy).\n",
    )
    assert json.loads(run_locks("status", "--older-than", "1h", "--json").stdout) == []

    time.sleep(1.2)  # real time: the holder's age passes a second
    old = run_locks("status", "--older-than", "1s")
    assert old.returncode == 2, old.stderr
    assert "nightly_report" in old.stdout
    assert str(holder.pid) in old.stdout
    assert "1 lock holder held longer than 1s" in old.stderr
    listed = run_locks("status", "--older-than", "1", "--json")
    assert listed.returncode == 2
    [row] = json.loads(listed.stdout)
    assert (row["name"], row["pid"], row["state"]) == ("nightly_report", holder.pid, "held")
    assert row["age_seconds"] > 1


def test_older_than_through_call_command_raises_with_status_2(file_locks):
    with CommandIsolation("reindex").try_lock():
        call_command("locks", "status", "--older-than", "1h")  # nothing listed: no error
        time.sleep(0.3)
        with pytest.raises(CommandError) as raised:
            call_command("locks", "status", "--older-than", "0.2")
    assert raised.value.returncode == 2


def _read_until(leader: int, count: int, marker: bytes) -> bytes:
    output = b""
    deadline = time.monotonic() + TIMEOUT
    while output.count(marker) < count and time.monotonic() < deadline:
        output += os.read(leader, 65536)
    return output


def test_watch_redraws_on_a_terminal_until_interrupted(holder):
    leader, follower = os.openpty()
    with subprocess.Popen(
        [sys.executable, "manage.py", "locks", "status", "--watch", "0.2"],
        cwd=ROOT,
        env=child_env(),
        stdout=follower,
        stderr=subprocess.PIPE,
    ) as process:
        os.close(follower)
        try:
            output = _read_until(leader, 3, b"\x1b[H\x1b[2J")  # three draws: two redraws
            process.send_signal(signal.SIGINT)
            assert process.wait(TIMEOUT) == 0
            assert process.stderr is not None
            assert b"Traceback" not in process.stderr.read()
        finally:
            os.close(leader)
    draws = output.split(b"\x1b[H\x1b[2J")[1:]
    assert len(draws) >= 3
    for draw in draws[:2]:
        assert b"Every 0.2s: locks status" in draw
        assert b"nightly_report" in draw


def test_watch_on_a_pipe_prints_timestamped_draws_and_json_lines(holder):
    def watch(*args: str) -> list[str]:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "locks", "status", "--watch=0.1", *args],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(8 if not args else 2)]
        process.send_signal(signal.SIGINT)
        lines += process.stdout.readlines()
        assert process.wait(TIMEOUT) == 0
        return lines

    lines = watch()
    assert lines[0].startswith("Every 0.1s: locks status")
    assert lines[0].endswith(" UTC\n")
    assert lines[1] == "\n"
    assert lines[2].startswith("NAME ")
    assert lines[3].startswith("nightly_report ")
    assert lines[4] == "\n"  # a blank line between draws
    assert lines[5].startswith("Every 0.1s:")
    assert "\x1b" not in "".join(lines)

    for line in watch("--json")[:2]:
        [row] = json.loads(line)
        assert row["pid"] == holder.pid


@pytest.fixture
def many_locks(settings, tmp_path) -> Iterator[Path]:
    """A LOCK_DIR for 10,000 lock files: in RAM when the machine has /dev/shm (creating that
    many files on a disk takes seconds on some machines)."""
    where = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="isolatable-status-", dir=where or tmp_path) as top:
        lock_dir = Path(top) / "locks"
        lock_dir.mkdir(mode=0o700)
        settings.ISOLATABLE = {"STRATEGY": "file", "LOCK_DIR": str(lock_dir)}
        yield lock_dir


def test_status_streams_10000_locks(many_locks):
    file_locks = many_locks
    env = child_env(
        ISOLATABLE_TEST_SETTINGS=json.dumps({"STRATEGY": "file", "LOCK_DIR": str(file_locks)})
    )
    holder = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.status", "hold", str(MANY)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdin is not None
    try:
        assert holder.stdout.readline() == "held\n"
        listed = run_locks("status", "--json")
        table = run_locks("status")
    finally:
        holder.stdin.close()
        assert holder.wait(TIMEOUT) == 0
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)  # one valid JSON list, streamed
    assert len(rows) == MANY
    assert {row["name"] for row in rows} == {f"status-bench:{n:05d}" for n in range(MANY)}
    assert {(row["state"], row["pid"]) for row in rows} == {("held", holder.pid)}
    lines = table.stdout.splitlines()
    assert len(lines) == MANY + 1
    assert "LABEL" in lines[0]  # past BATCH rows: always there
    assert "MODE" in lines[0]
    assert len({len(line) for line in lines[1 : BATCH + 10]}) == 1  # widths kept past the batch


def test_a_small_table_is_unchanged_by_streaming(file_locks):
    with CommandIsolation("a").try_lock(), CommandIsolation("b" * 80).try_lock():
        lines = run_locks("status").stdout.splitlines()
    assert "MODE" not in lines[0]
    assert "LABEL" not in lines[0]
    assert lines[0].index("STATE") == 82  # the long name sets the column's width


def test_watch_seconds_must_be_positive(file_locks):
    with pytest.raises((CommandError, SystemExit, argparse.ArgumentTypeError)):
        call_command("locks", "status", "--watch", "0")


def test_watch_stops_quietly_when_its_reader_leaves(file_locks):
    process = subprocess.Popen(
        [sys.executable, "manage.py", "locks", "status", "--watch=0.05"],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stdout.readline().startswith(b"Every 0.05s")
    process.stdout.close()  # as `| head -1` does
    _, errors = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0
    assert errors == b""
