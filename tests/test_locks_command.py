"""``manage.py locks release`` acts only on the holder it judged, by its token, at the moment of
release: a lock that another process took after the listing is reported and left alone."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.core.management.base import CommandError

from django_isolatable.backends import backend_for
from django_isolatable.holders import new_record
from tests.strategies import (
    CACHE_ON_REDIS,
    DATABASE_ON_MARIADB,
    DATABASE_ON_POSTGRES,
    DATABASE_ON_SQLITE,
)
from tests.test_locks_cli import run_locks

ROOT = Path(__file__).resolve().parent.parent
#: Takes a lock once (so it is connected), prints "ready", waits for a line on stdin, then
#: takes each lock named on its command line with try_lock(), last name first, printing
#: "took <name> <token>" for each; then "done", and holds them until stdin closes.
TAKER = """
import sys
import django
django.setup()
from django_isolatable import AlreadyRunning, CommandIsolation
guards = []
CommandIsolation(f"warm-up-{sys.argv[1]}").try_lock().release()  # connected, renewal running
print("ready", flush=True)
sys.stdin.readline()
for name in reversed(sys.argv[1:]):
    try:
        guards.append(CommandIsolation(name).try_lock())
    except AlreadyRunning:
        continue
    print("took", name, guards[-1].info.token, flush=True)
print("done", flush=True)
sys.stdin.read()
for guard in guards:
    guard.release()
"""
RACE_LOCKS = 400
EVENT_TIMEOUT = 60.0  # seconds; only a hang should ever hit it


def child_env() -> dict[str, str]:
    """The environment of a child that uses the current ISOLATABLE settings."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "ISOLATABLE_TEST_SETTINGS": json.dumps(django_settings.ISOLATABLE),
    }


def start_taker(names: list[str]) -> subprocess.Popen[str]:
    taker = subprocess.Popen(
        [sys.executable, "-c", TAKER, *names],
        cwd=ROOT,
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert taker.stdout is not None
    assert taker.stdout.readline() == "ready\n"
    return taker


def take(taker: subprocess.Popen[str]) -> dict[str, str]:
    """Tell a ready taker to go; the tokens it took, by lock name, once it is done."""
    assert taker.stdin is not None
    assert taker.stdout is not None
    taker.stdin.write("go\n")
    taker.stdin.flush()
    taken = {}
    for line in taker.stdout:
        if line == "done\n":
            return taken
        _, name, token = line.split()
        taken[name] = token
    pytest.fail(f"taker {taker.pid} exited before it was done")


@pytest.mark.parametrize(
    "config", [DATABASE_ON_SQLITE, DATABASE_ON_POSTGRES], ids=lambda config: config.id
)
def test_release_stale_force_never_touches_a_holder_that_took_the_lock_after_the_listing(
    config,
):
    """Hundreds of locks of a SIGKILLed holder; once the release has started, another process
    takes them from the other end. Every lock it took is still its own when the release is done.
    """
    config.require_service()
    names = [f"race-{os.getpid()}-{n:04d}" for n in range(RACE_LOCKS)]
    with config.override_settings():
        backend = backend_for()
        dead = start_taker(names)
        stale = take(dead)
        assert len(stale) == RACE_LOCKS
        dead.kill()
        dead.wait()
        taker = start_taker(names)
        try:
            release = subprocess.Popen(
                [sys.executable, "-m", "django", "locks", "release", "--stale", "--force"],
                cwd=ROOT,
                env={**child_env(), "PYTHONUNBUFFERED": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            # Nobody reads its output until the taker is done: with a one-page pipe, the release
            # stops at its first hundred lines or so, whatever the speeds of the two processes.
            assert release.stdout is not None
            fcntl.fcntl(release.stdout, fcntl.F_SETPIPE_SZ, 4096)
            deadline = time.monotonic() + EVENT_TIMEOUT
            # The listing is done once the first stale lock is released (it goes in name order).
            while (
                getattr((backend.inspect(names[0]) or [None])[0], "token", None) == stale[names[0]]
            ):
                assert release.poll() is None, release.stdout.read()
                assert time.monotonic() < deadline, "the release never started"
                time.sleep(0.001)
            taken = take(taker)
            text = release.stdout.read().decode()
            status = release.wait(EVENT_TIMEOUT)
            # Each lock the taker holds is still its own: none was force-released under it.
            holders = {name: (backend.inspect(name) or [None])[0] for name in taken}
            assert {name: getattr(info, "token", None) for name, info in holders.items()} == taken
            assert status == 1, text
            changed = re.findall(
                rf"^(race-\S+) now has another holder \(pid {taker.pid} on \S+\); not released\.$",
                text,
                re.MULTILINE,
            )
            assert changed, f"the taker took no lock between the listing and its release:\n{text}"
            assert text.rstrip().endswith(f"CommandError: {len(changed)} locks were not released.")
            released = re.findall(r"^Released stale lock (race-\S+) \(pid ", text, re.MULTILINE)
            assert sorted(released + changed) == names
        finally:
            for process in (dead, taker):
                if process.poll() is None:
                    process.kill()
                process.wait()
            for name in names:
                backend.force_release(name)


BACKEND_CONFIGS = [DATABASE_ON_SQLITE, DATABASE_ON_POSTGRES, DATABASE_ON_MARIADB, CACHE_ON_REDIS]


@pytest.mark.parametrize("config", BACKEND_CONFIGS, ids=lambda config: config.id)
def test_force_release_with_a_token_acts_only_while_that_token_holds_the_lock(config):
    config.require_service()
    name = f"by-token-{os.getpid()}"
    with config.override_settings():
        backend = backend_for()
        first = backend.acquire(name, new_record(name, config.strategy, ttl=60))
        assert first is not None
        try:
            assert backend.force_release(name, token="0" * 32) is False
            assert backend.inspect(name)[0].token == first.token  # type: ignore[union-attr]
            assert backend.force_release(name, token=first.token) is True
            assert backend.inspect(name) == []
            second = backend.acquire(name, new_record(name, config.strategy, ttl=60))
            assert second is not None
            assert backend.force_release(name, token=first.token) is False  # judged earlier
            assert backend.inspect(name)[0].token == second.token  # type: ignore[union-attr]
            assert backend.force_release(name) is True  # no token: whoever holds it
            assert backend.inspect(name) == []
        finally:
            backend.force_release(name)


def test_a_holder_whose_record_has_no_token_is_not_released(settings):
    """Nothing could tell it from a holder that took the lock since: fail closed."""
    settings.ISOLATABLE = {**settings.ISOLATABLE, "STRATEGY": "cache"}
    name = f"no-token-{os.getpid()}"
    backend: Any = backend_for()
    record = new_record(name, "cache", ttl=60).to_dict()
    assert backend.cache.add(backend._key(name), {"record": record}, 60)
    try:
        stdout, stderr = io.StringIO(), io.StringIO()
        with pytest.raises(CommandError) as raised:
            call_command("locks", "release", name, "--force", stdout=stdout, stderr=stderr)
        assert raised.value.returncode == 1
        assert stderr.getvalue() == (
            f"Not releasing {name}: its holder's record (pid {os.getpid()} on "
            f"{socket.gethostname()}) has no owner token, so it cannot be released safely.\n"
        )
        assert backend.inspect(name) != []
    finally:
        backend.cache.delete(backend._key(name))


@pytest.mark.parametrize("record", [b'{"token": 5, "pid": "x"', b"[" * 60_000, b"\xff\xfe"])
def test_a_free_file_lock_with_a_corrupt_record_is_released_as_stale(settings, tmp_path, record):
    """The kernel says nobody holds it, so its unreadable record is stale: ``release --stale``
    clears it (it used to refuse it as "cannot be judged" and exit 1)."""
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o700)
    settings.ISOLATABLE = {"STRATEGY": "file", "LOCK_DIR": str(lock_dir)}
    (lock_dir / "corrupt.lock").write_bytes(record)
    (lock_dir / "corrupt.lock").chmod(0o600)
    assert "corrupt  stale" in run_locks("status").stdout

    released = run_locks("release", "--stale")

    assert released.returncode == 0, released.stderr
    assert released.stdout.startswith("Released stale lock corrupt ")
    assert run_locks("status").stdout.strip() == "No locks (file strategy)."


def test_a_held_file_lock_with_a_corrupt_record_is_not_released_as_stale(settings, tmp_path):
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o700)
    settings.ISOLATABLE = {"STRATEGY": "file", "LOCK_DIR": str(lock_dir)}
    path = lock_dir / "corrupt.lock"
    path.write_bytes(b"[" * 60_000)
    path.chmod(0o600)
    holder = subprocess.Popen(  # holds the kernel lock without writing a record
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'r+'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        released = run_locks("release", "--stale")
        assert released.returncode == 0, released.stderr
        assert released.stdout.strip() == "No stale locks."
        assert path.read_bytes() == b"[" * 60_000
    finally:
        holder.kill()
        holder.wait()
