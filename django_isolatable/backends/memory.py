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

from django_isolatable.backends.base import Backend, Lease, Waiting
from django_isolatable.backends.periods import MemoryPeriods
from django_isolatable.holders import LockInfo

_held: dict[str, LockInfo] = {}
_changed = threading.Condition()


def _reset_after_fork() -> None:
    global _changed
    _held.clear()
    _changed = threading.Condition()


os.register_at_fork(after_in_child=_reset_after_fork)


class MemoryBackend(Backend, Waiting, MemoryPeriods):
    strategy: ClassVar[str] = "memory"

    def _key(self, name: str) -> str:
        # A NUL between them, as names never hold one: "P:ns:" + "job" is not "P:" + "ns:job".
        prefix = self.options.key_prefix
        return f"{prefix}\0{name}" if prefix else name

    def _mine(self, key: str) -> bool:
        prefix = self.options.key_prefix
        return key.startswith(f"{prefix}\0") if prefix else "\0" not in key

    def acquire(self, name: str, info: LockInfo) -> Lease | None:
        key = self._key(name)
        with _changed:
            if key in _held:
                return None
            _held[key] = info
        return Lease(name=name, token=info.token or "", info=info)

    def release(self, lease: Lease) -> bool:
        if lease.pid != os.getpid():
            return False
        key = self._key(lease.name)
        with _changed:
            current = _held.get(key)
            if current is None or current.token != lease.token:
                return False
            del _held[key]
            _changed.notify_all()
        return True

    def inspect(self, name: str) -> list[LockInfo]:
        with _changed:
            info = _held.get(self._key(name))
        return [] if info is None else [replace(info, alive=True)]

    def list(self) -> Iterator[LockInfo]:
        with _changed:
            infos = [info for key, info in sorted(_held.items()) if self._mine(key)]
        return iter([replace(info, alive=True) for info in infos])

    def force_release(self, name: str, token: str | None = None) -> bool:
        key = self._key(name)
        with _changed:
            current = _held.get(key)
            if current is None or (token is not None and current.token != token):
                return False
            del _held[key]
            _changed.notify_all()
        return True

    def acquire_waiting(self, name: str, info: LockInfo, timeout: float) -> Lease | None:
        key = self._key(name)
        with _changed:
            if not _changed.wait_for(lambda: key not in _held, timeout):
                return None
            _held[key] = info
        return Lease(name=name, token=info.token or "", info=info)
