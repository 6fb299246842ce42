"""Gate files of the file strategy: writer preference for shared locks.

An exclusive locker that waits for a lock file (``FileBackend.acquire_waiting``) holds
``<lock file>+gate`` exclusively for as long as it waits, and a new shared holder takes the gate
shared for the instant it takes the lock file (``heldfiles.join``), so shared holds asked for
after a locker began to wait wait behind it. One gate descriptor per process and gate, held
while any thread of the process waits at it; within a process (and on NFS, where a process's
locks never conflict with each other) the table of waiting gates answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(eq=False)
class Gate:
    """A gate file at which ``waiters`` exclusive lockers of this process wait, opened as
    ``fd``; ``locked`` once this process holds it for them."""

    path: str
    fd: int
    waiters: int = 1
    locked: bool = False


_gates: dict[str, Gate] = {}
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    for gate in _gates.values():  # the parent's to unlock
        with contextlib.suppress(OSError):
            os.close(gate.fd)
    _gates.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def waiting(path: str) -> bool:
    """Whether an exclusive locker of this process waits at the gate ``path``."""
    return path in _gates


def enter(path: str, open_file: Callable[[str], int]) -> Gate:
    """Wait at the gate ``path`` (holding off new shared holds), locking it for this process
    if it can now (``lock`` tries again later). End with ``leave``."""
    with _lock:
        gate = _gates.get(path)
        if gate is not None:
            gate.waiters += 1
        else:
            gate = _gates[path] = Gate(path, open_file(path))
        _lock_gate(gate)
        return gate


def lock(gate: Gate) -> None:
    """Try again to lock ``gate`` for this process, if it is not yet: another process's
    locker held it, or a new shared holder was passing it."""
    if not gate.locked:
        with _lock:
            _lock_gate(gate)


def _lock_gate(gate: Gate) -> None:
    if not gate.locked:
        try:
            fcntl.flock(gate.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held, tried again; others: the gate only helps
            return
        gate.locked = True


def leave(gate: Gate) -> None:
    """Stop waiting at ``gate``; the last waiter of this process closes it (unlocking it)."""
    with _lock:
        gate.waiters -= 1
        if gate.waiters:
            return
        del _gates[gate.path]
    os.close(gate.fd)
