"""Records and names made by someone hostile, or by accident, never crash a reader.

A record nobody can parse or judge reads as unknown (fail closed: ``alive`` None, fields None);
``locks status`` and ``try_lock()`` go on. Names, hosts and command lines from a store are shown
escaped, so they can neither forge table rows nor send sequences to a terminal, and an
undecodable name never stops output on a strict UTF-8 stdout.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections

from django_isolatable import AlreadyRunning, CommandIsolation
from django_isolatable.backends import backend_for
from django_isolatable.holders import (
    LockInfo,
    from_epoch_microseconds,
    host_id,
    is_alive,
    new_record,
    printable,
)
from tests.strategies import CACHE_ON_REDIS, DATABASE_ON_POSTGRES, DATABASE_ON_SQLITE, REDIS

ROOT = Path(__file__).resolve().parent.parent
DEEP = "[" * 60_000
YEAR_ONE = "0001-01-01T00:00:00+05:00"
#: Holds a lock file's flock and writes ``argv[2]`` (a file's text) as its record, as a
#: hostile or broken holder would; prints "held" and keeps it until stdin closes.
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.pwrite(fd, open(sys.argv[2], "rb").read(), 0)
print("held", flush=True)
sys.stdin.read()
"""


def locks(*args: str) -> str:
    stdout = io.StringIO()
    call_command("locks", *args, stdout=stdout, stderr=io.StringIO())
    return stdout.getvalue()


@pytest.fixture
def held_with_record(lock_dir: Path, tmp_path: Path) -> Iterator[object]:
    """``hold(name, text)``: a child process holds the file lock ``name`` with ``text`` as its
    record (the lock file as anyone who can write LOCK_DIR may leave it)."""
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    children: list[subprocess.Popen[str]] = []

    def hold(name: str, text: str) -> None:
        path = CommandIsolation(name).lock_path()
        record = tmp_path / f"record-{len(children)}"
        record.write_text(text)
        child = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), str(record)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline() == "held\n"

    yield hold
    for child in children:
        child.kill()
        child.wait()


# --- records that cannot be parsed -------------------------------------------------------------


def test_a_record_nested_too_deep_to_parse_is_unknown():
    assert LockInfo.from_json("x", "file", DEEP) == LockInfo(name="x", strategy="file")
    assert LockInfo.from_json("x", "file", DEEP.encode()) == LockInfo(name="x", strategy="file")


@pytest.mark.parametrize("when", [YEAR_ONE, "9999-12-31T23:59:59-05:00"])
def test_a_time_past_the_ends_of_datetime_is_unknown(when):
    data = {**new_record("x", "file").to_dict(), "acquired_at": when, "process_started_at": when}
    info = LockInfo.from_dict("x", "file", data)
    assert (info.acquired_at, info.process_started_at) == (None, None)


@pytest.mark.parametrize("text", ["²", "١٢٣", "9" * 5000])
def test_server_times_that_are_no_number_this_code_wrote_are_unknown(text):
    assert from_epoch_microseconds(text) is None


@pytest.mark.parametrize("pid", [-1, 0, 2**31, 2**70])
def test_a_pid_no_process_can_have_cannot_be_judged(pid):
    """psutil raises ValueError for -1 and reports 0 and out-of-range pids as gone: neither is
    proof that a holder died."""
    info = dataclasses.replace(new_record("x", "redis"), pid=pid, alive=None)
    assert is_alive(info) is None


@pytest.mark.parametrize("btime", ["9" * 5000, "²", "9" * 400])
def test_a_boot_time_no_clock_can_have_cannot_be_judged(btime):
    machine = host_id().rpartition(" btime=")[0]
    info = dataclasses.replace(new_record("x", "redis"), host_id=f"{machine} btime={btime}")
    assert is_alive(dataclasses.replace(info, alive=None)) is None


def test_a_lock_file_nested_too_deep_breaks_neither_status_nor_release_nor_try_lock(
    held_with_record,
):
    held_with_record("deep", DEEP)
    with CommandIsolation("fine").lock():
        assert {row["name"] for row in json.loads(locks("status", "--json"))} == {"deep", "fine"}
        rows = [line.split() for line in locks("status").splitlines()[1:]]
        assert [row[:4] for row in rows] == [
            ["deep", "held", "?", "?"],
            ["fine", "held", str(os.getpid()), socket.gethostname()],
        ]
        (row,) = json.loads(locks("status", "deep", "--json"))
        assert (row["state"], row["pid"], row["started_at"], row["command"]) == (
            "held",
            None,
            None,
            "",
        )
        assert locks("status", "deep").splitlines()[1].split()[:3] == ["deep", "held", "?"]
    with pytest.raises(CommandError) as raised:
        locks("release", "deep")
    assert raised.value.returncode == 1
    with pytest.raises(AlreadyRunning) as error:
        CommandIsolation("deep").try_lock()
    assert error.value.holder == LockInfo(name="deep", strategy="file", alive=True)


def test_a_lock_file_of_year_one_shows_unknown_times(held_with_record):
    data = {**new_record("old", "file").to_dict(), "acquired_at": YEAR_ONE}
    held_with_record("old", json.dumps(data))
    (row,) = json.loads(locks("status", "--json"))
    assert (row["name"], row["state"], row["started_at"], row["age_seconds"]) == (
        "old",
        "held",
        None,
        None,
    )
    assert locks("status").splitlines()[1].split()[4:6] == ["-", "-"]
    with pytest.raises(AlreadyRunning):
        CommandIsolation("old").try_lock()


@pytest.mark.parametrize(
    "config", [DATABASE_ON_SQLITE, DATABASE_ON_POSTGRES], ids=lambda config: config.id
)
def test_a_database_row_of_year_one_breaks_neither_status_nor_try_lock(config):
    """PostgreSQL keeps year 1 at +05:00 as a date B.C., which psycopg refuses to read."""
    config.require_service()
    names = [f"year-one-{os.getpid()}", f"year-two-{os.getpid()}"]
    with config.override_settings():
        guards = [CommandIsolation(name).try_lock() for name in names]
        try:
            alias = config.isolatable_settings["DATABASE_ALIAS"]
            with connections[alias].cursor() as cursor:
                cursor.execute(
                    "UPDATE django_isolatable_lock SET acquired_at = %s, process_started_at = %s "
                    "WHERE token = %s",
                    ["0001-01-01 00:00:00+05", "0001-01-01 00:00:00+05", guards[0].info.token],
                )
                assert cursor.rowcount == 1
            listed = {row["name"]: row for row in json.loads(locks("status", "--json"))}
            assert (listed[names[0]]["state"], listed[names[0]]["started_at"]) == ("held", None)
            assert listed[names[1]]["started_at"] == guards[1].info.acquired_at.isoformat()
            (row,) = json.loads(locks("status", names[0], "--json"))
            assert (row["pid"], row["started_at"], row["age_seconds"]) == (os.getpid(), None, None)
            with pytest.raises(AlreadyRunning) as error:
                CommandIsolation(names[0]).try_lock()
            assert error.value.holder is not None
            assert error.value.holder.token == guards[0].info.token
        finally:
            for guard in guards:
                guard.release()


@pytest.fixture
def redis_settings():
    REDIS.require_service()
    with REDIS.override_settings():
        yield


def test_a_redis_record_with_pid_minus_one_is_a_holder_that_cannot_be_judged(redis_settings):
    name = f"pid-minus-one-{os.getpid()}"
    record = dataclasses.replace(new_record(name, "redis", ttl=60), pid=-1)
    backend = backend_for()
    key = backend._keys(name).lock  # type: ignore[attr-defined]
    backend.client.set(key, f"{record.token} {record.to_json()}", px=60_000)  # type: ignore[attr-defined]
    try:
        (row,) = json.loads(locks("status", name, "--json"))
        assert (row["state"], row["pid"]) == ("held", -1)
        assert name in [row["name"] for row in json.loads(locks("status", "--json"))]
        with pytest.raises(AlreadyRunning) as error:
            CommandIsolation(name).try_lock()
        assert error.value.holder is not None
        assert (error.value.holder.pid, error.value.holder.alive) == (-1, None)
    finally:
        backend.client.delete(key)  # type: ignore[attr-defined]


# --- names and commands shown as text ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("import_data", "import_data"),
        ("tenant:ünïcode 🔒", "tenant:ünïcode 🔒"),
        ("a\\b", "a\\b"),
        ("tenant:\udcff", "tenant:\\udcff"),
        ("x\nNAME  held", "x\\nNAME  held"),
        ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
        ("\u202eevil", "\\u202eevil"),
        ("\r\t\x9b", "\\r\\t\\x9b"),
    ],
)
def test_printable_escapes_what_a_terminal_would_act_on(text, shown):
    assert printable(text) == shown
    shown.encode()  # any UTF-8 stdout can carry it


HOSTILE_NAMES = ["tenant:\udcff", "forged\nfake  held   1  evil", "\x1b[2Jcleared"]


def run_locks(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """``python -m django locks ARGS`` with this test's settings and a strict UTF-8 stdout."""
    return subprocess.run(
        [sys.executable, "-m", "django", "locks", "--no-color", *args],
        cwd=ROOT,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PYTHONIOENCODING": "utf-8:strict",
            **env,
        },
        capture_output=True,
        timeout=60,
    )


def test_status_shows_hostile_names_and_commands_escaped_on_a_strict_utf8_stdout(
    lock_dir, monkeypatch
):
    monkeypatch.setattr(sys, "argv", ["manage.py", "job", "--note", "a\nb\x1b[31m"])
    env = {"ISOLATABLE_TEST_SETTINGS": json.dumps({"LOCK_DIR": str(lock_dir)})}
    guards = [CommandIsolation(name).try_lock() for name in HOSTILE_NAMES]
    try:
        table = run_locks("status", env=env)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.decode().splitlines()
        assert len(lines) == 1 + len(HOSTILE_NAMES)
        assert b"\x1b" not in table.stdout
        rows = {line.split("  ")[0] for line in lines[1:]}
        assert rows == {"tenant:\\udcff", "forged\\nfake", "\\x1b[2Jcleared"}
        assert all(line.endswith("manage.py job --note a\\nb\\x1b[31m") for line in lines[1:])
        named = run_locks("status", "tenant:\udcff", env=env)
        assert named.returncode == 0, named.stderr
        assert named.stdout.decode().splitlines()[1].startswith("tenant:\\udcff  held  ")
        as_json = run_locks("status", "--json", env=env)
        assert as_json.returncode == 0, as_json.stderr
        assert as_json.stdout.isascii()
        assert sorted(row["name"] for row in json.loads(as_json.stdout)) == sorted(HOSTILE_NAMES)
    finally:
        for guard in guards:
            guard.release()


@pytest.fixture
def cache_settings():
    CACHE_ON_REDIS.require_service()
    with CACHE_ON_REDIS.override_settings():
        yield


def dead_pid() -> int:
    """The pid of a process that ran on this host and was reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_release_stale_releases_every_stale_lock_whatever_its_name(cache_settings):
    """Every message names the lock escaped, so none stops the run halfway."""
    backend = backend_for()
    suffix = f"-{os.getpid()}"
    names = [f"a-first{suffix}", *(name + suffix for name in HOSTILE_NAMES), f"z-last{suffix}"]
    pid = dead_pid()
    for name in names:
        record = dataclasses.replace(new_record(name, "cache", ttl=60), pid=pid)
        assert backend.acquire(name, record) is not None
    try:
        env = {"ISOLATABLE_TEST_SETTINGS": json.dumps(CACHE_ON_REDIS_ENV)}
        release = run_locks("release", "--stale", env=env)
        assert release.returncode == 0, release.stderr
        out = release.stdout.decode()
        assert b"\x1b" not in release.stdout
        for name in names:
            assert f"Released stale lock {printable(name)} (pid {pid} on " in out
        assert [backend.inspect(name) for name in names] == [[]] * len(names)
    finally:
        for name in names:
            backend.force_release(name)


CACHE_ON_REDIS_ENV = {"STRATEGY": "cache", **CACHE_ON_REDIS.isolatable_settings}
