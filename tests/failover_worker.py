"""A holder for the failover rounds of tests/test_redis_ha.py.

Run as ``python -m tests.failover_worker NAME JOURNAL`` with
``DJANGO_SETTINGS_MODULE=tests.settings`` and ``ISOLATABLE_TEST_SETTINGS`` pointing the redis
strategy at a Sentinel group. It prints ``ready``, then until a line arrives on stdin: waits
for lock NAME, keeps it until the lock is reported lost (``lock_lost``), and starts again.
Every belief is journaled, one line each, ``<pid> <event> <time.monotonic()> <token>`` with
event ``acquired`` (``lock()`` returned), ``lost`` (when the loss was reported) or
``released`` (just before the release, on the way out): the test reads from the journals who
believed it held the lock when.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import django

django.setup()

from django_isolatable import CommandIsolation, LockTimeout  # noqa: E402
from django_isolatable.errors import IsolationError  # noqa: E402
from django_isolatable.signals import lock_lost  # noqa: E402


def main(name: str, journal_path: str) -> None:
    stop, lost = threading.Event(), threading.Event()

    def on_lost(sender: object, **kwargs: object) -> None:
        write("lost", kwargs["guard"].info.token)  # type: ignore[attr-defined]
        lost.set()

    lock_lost.connect(on_lost, weak=False)
    journal = open(journal_path, "a", buffering=1)  # noqa: SIM115  # a line each, at once

    def write(event: str, token: str | None) -> None:
        journal.write(f"{os.getpid()} {event} {time.monotonic():.6f} {token}\n")

    def await_stop() -> None:
        sys.stdin.readline()
        stop.set()
        lost.set()

    threading.Thread(target=await_stop, daemon=True).start()
    isolation = CommandIsolation(name)
    print("ready", flush=True)
    while not stop.is_set():
        try:
            guard = isolation.lock(timeout=0.5)
        except LockTimeout:
            continue
        except IsolationError:  # the master is down, or not yet replaced
            time.sleep(0.1)
            continue
        write("acquired", guard.info.token)
        print("acquired", flush=True)
        lost.wait()
        if not guard.lost:
            write("released", guard.info.token)
        guard.release()
        lost.clear()
    journal.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
