"""The cache strategy's semaphores between real processes, on Django's RedisCache (skipped when
Redis is down, see tests/services.py): spawned processes racing for slots never exceed the
count, and a SIGKILLed holder's slot is free again at once (the same-host takeover)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from django_isolatable import AlreadyRunning, CommandIsolation
from tests import services
from tests.test_database_holders import LONG_TTL, SLOTS, _hold, race_for_slots, spawning

SETTINGS: dict[str, Any] = {"STRATEGY": "cache", "CACHE_ALIAS": "redis", "TTL": LONG_TTL}


@pytest.fixture
def name(request, settings, monkeypatch) -> Iterator[str]:
    """A lock name of this test's own, on the cache strategy here and in spawned processes."""
    services.require("redis")
    monkeypatch.setenv("ISOLATABLE_TEST_SETTINGS", json.dumps(SETTINGS))
    settings.ISOLATABLE = {**settings.ISOLATABLE, **SETTINGS}
    unique = f"cache-holders:{request.node.name}:{os.getpid()}:{time.monotonic_ns()}"
    yield unique
    CommandIsolation(unique).release_all()


def test_processes_racing_for_slots_never_exceed_the_count(name, tmp_path):
    race_for_slots(name, tmp_path)


def test_a_sigkilled_slot_holders_entry_is_freed_at_once(name):
    ours, theirs = spawning.Pipe()
    holder = spawning.Process(target=_hold, args=(name, theirs))
    holder.start()
    try:
        assert ours.poll(60), "the holder took no slot"
        token = ours.recv()
        isolation = CommandIsolation(name, max_holders=SLOTS)
        first = isolation.try_lock()
        with pytest.raises(AlreadyRunning):
            CommandIsolation(name, max_holders=SLOTS).try_lock()
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(30)
        started = time.monotonic()
        second = CommandIsolation(name, max_holders=SLOTS).lock(timeout=10)
        assert time.monotonic() - started < LONG_TTL / 3  # not the entry's expiry
        tokens = {h.token for h in isolation.holders()}
        assert tokens == {first.info.token, second.info.token}
        assert token not in tokens
        first.release()
        second.release()
        assert isolation.holders() == []
        with CommandIsolation(name).try_lock():  # the header went with the last slot
            pass
    finally:
        if holder.is_alive():
            holder.kill()
        holder.join(30)
