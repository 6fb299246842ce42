"""The memory strategy: a process-local, thread-safe registry. For tests and single-process use.

Every ``MemoryBackend`` in a process shares one registry, so two ``CommandIsolation`` objects
exclude each other; other processes see nothing. A forked child starts with an empty registry.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import ClassVar

from django_isolatable.backends.base import (
    Backend,
    Fencing,
    Lease,
    Semaphore,
    Shared,
    Waiting,
    WakeUps,
    holder_count_mismatch,
)
from django_isolatable.backends.periods import MemoryPeriods
from django_isolatable.holders import LockInfo, replace_token

#: Each name's holders: one exclusive holder, or any number of shared or semaphore holders.
_held: dict[str, list[LockInfo]] = {}
#: How many exclusive lockers wait for each name (shared holds wait behind them).
_writers: dict[str, int] = {}
#: The last fencing token issued for each name.
_fencing: dict[str, int] = {}
_changed = threading.Condition()


def _reset_after_fork() -> None:
    global _changed
    _held.clear()
    _writers.clear()
    _fencing.clear()
    _changed = threading.Condition()


os.register_at_fork(after_in_child=_reset_after_fork)


class MemoryBackend(Backend, Waiting, WakeUps, Semaphore, Shared, Fencing, MemoryPeriods):
    strategy: ClassVar[str] = "memory"

    def _key(self, name: str) -> str:
        # A NUL between them, as names never hold one: "P:ns:" + "job" is not "P:" + "ns:job".
        prefix = self.options.key_prefix
        return f"{prefix}\0{name}" if prefix else name

    def _mine(self, key: str) -> bool:
        prefix = self.options.key_prefix
        return key.startswith(f"{prefix}\0") if prefix else "\0" not in key

    def _take(self, name: str, key: str, info: LockInfo) -> Lease:
        """Record ``info`` as a holder of ``key`` (the caller holds ``_changed``)."""
        _held.setdefault(key, []).append(info)
        return Lease(name=name, token=info.token or "", info=info)

    def acquire(self, name: str, info: LockInfo) -> Lease | None:
        key = self._key(name)
        with _changed:
            if key in _held:
                return None
            return self._take(name, key, info)

    def acquire_slot(self, name: str, info: LockInfo, max_holders: int) -> Lease | None:
        key = self._key(name)
        with _changed:
            holders = _held.get(key, [])
            for holder in holders:
                if holder.max_holders != max_holders or holder.mode == "shared":
                    raise holder_count_mismatch(name, holder.max_holders, max_holders)
            if len(holders) >= max_holders:
                return None
            return self._take(name, key, info)

    def acquire_shared(self, name: str, info: LockInfo) -> Lease | None:
        key = self._key(name)
        with _changed:
            holders = _held.get(key, [])
            if _writers.get(key) or any(h.mode != "shared" for h in holders):
                return None
            return self._take(name, key, info)

    def _drop(self, key: str, token: str | None) -> bool:
        """Drop the holder with ``token`` (every holder: None) of ``key``; the caller holds
        ``_changed``."""
        holders = _held.get(key)
        if not holders:
            return False
        kept = [] if token is None else [h for h in holders if h.token != token]
        if len(kept) == len(holders):
            return False
        if kept:
            _held[key] = kept
        else:
            del _held[key]
        _changed.notify_all()
        return True

    def release(self, lease: Lease) -> bool:
        if lease.pid != os.getpid():
            return False
        with _changed:
            return self._drop(self._key(lease.name), lease.token)

    def inspect(self, name: str) -> list[LockInfo]:
        with _changed:
            holders = list(_held.get(self._key(name), ()))
        return [replace(info, alive=True) for info in holders]

    def list(self) -> Iterator[LockInfo]:
        with _changed:
            infos = [
                info
                for key, holders in sorted(_held.items())
                if self._mine(key)
                for info in holders
            ]
        return iter([replace(info, alive=True) for info in infos])

    def force_release(self, name: str, token: str | None = None) -> bool:
        with _changed:
            return self._drop(self._key(name), token)

    def acquire_waiting(self, name: str, info: LockInfo, timeout: float) -> Lease | None:
        key = self._key(name)
        with _changed:
            _writers[key] = _writers.get(key, 0) + 1
            try:
                if not _changed.wait_for(lambda: key not in _held, timeout):
                    return None
                return self._take(name, key, info)
            finally:
                _writers[key] -= 1
                if not _writers[key]:
                    del _writers[key]
                _changed.notify_all()

    def wait_for_release(self, name: str, timeout: float) -> None:
        with _changed:
            _changed.wait(timeout)  # any release wakes every waiter: they try again

    def fencing_token(self, lease: Lease) -> int | None:
        key = self._key(lease.name)
        with _changed:
            holders = _held.get(key, [])
            place = next((i for i, h in enumerate(holders) if h.token == lease.token), None)
            if place is None:
                return None
            token = _fencing[key] = _fencing.get(key, 0) + 1
            holders[place] = replace_token(holders[place], token)  # shown by `locks status`
        return token
