"""Wake-ups for the file backend's waiters: Linux inotify through ctypes, no dependency.

A waiter watches its lock file for IN_ATTRIB, which a releasing holder causes (``futimens``) right
after it unlocks, so the waiter retries at once instead of on the next poll. Where inotify is
missing (other systems, exhausted watch limits) ``watch`` returns None and the caller polls.

Watches are kept per (path, thread) for reuse, a bounded number of them: closing an inotify
instance waits for a kernel grace period (milliseconds), which must not land on a handoff.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import sys
import threading
from collections import OrderedDict

IN_ATTRIB = 0x00000004
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_MASK = IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1  # noqa: B018 - probe that the symbol exists
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_libc()


class FileWatch:
    """An inotify watch on one file. ``wait`` blocks until the file changes or time runs out."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, path: str) -> FileWatch | None:
        """Watch ``path``; None when inotify is unavailable here (callers then poll)."""
        if _libc is None:
            return None
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return None
        if _libc.inotify_add_watch(fd, os.fsencode(path), _MASK) < 0:
            os.close(fd)
            return None
        return cls(fd)

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True if the file changed (events are consumed)."""
        poller = select.poll()  # not select(): descriptors above 1024 are common in servers
        poller.register(self.fd, select.POLLIN)
        if not poller.poll(max(timeout, 0.0) * 1000):
            return False
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


_KEEP = 64
_watches: OrderedDict[tuple[str, int], FileWatch] = OrderedDict()
_watches_lock = threading.Lock()


def watch(path: str) -> tuple[FileWatch | None, bool]:
    """This thread's watch on ``path`` and whether it is new (None: inotify is unavailable).

    A new watch has seen nothing yet: the caller should retry before waiting on it, so that a
    release between its last attempt and the watch's creation is not missed.
    """
    key = (path, threading.get_ident())
    with _watches_lock:
        found = _watches.get(key)
        if found is not None:
            _watches.move_to_end(key)
            return found, False
    created = FileWatch.open(path)
    if created is None:
        return None, False
    with _watches_lock:
        _watches[key] = created
        while len(_watches) > _KEEP:
            _watches.popitem(last=False)[1].close()
    return created, True


def _forget_after_fork() -> None:
    # The child shares the parent's inotify instances; reading them would steal its events.
    for inherited in _watches.values():
        inherited.close()
    _watches.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
