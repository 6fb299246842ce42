"""Wake-ups for the file backend's waiters: Linux inotify through ctypes, no dependency.

A waiter watches its lock file for IN_ATTRIB, which a releasing holder causes (``futimens``) right
after it unlocks, so the waiter retries at once instead of on the next poll. Where inotify is
missing (other systems, exhausted watch limits) ``watch`` returns None and the caller polls.

Watches are kept for reuse: closing an inotify instance waits for a kernel grace period
(milliseconds), which must not land on a handoff.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import sys
import threading

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
    """One inotify instance watching any number of files. ``wait`` blocks until one changes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.paths: set[str] = set()
        self._poller = select.poll()  # not select(): descriptors above 1024 are common
        self._poller.register(fd, select.POLLIN)

    @classmethod
    def open(cls) -> FileWatch | None:
        """A new instance; None when inotify is unavailable here (callers then poll)."""
        if _libc is None:
            return None
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        return None if fd < 0 else cls(fd)

    def add(self, path: str) -> bool:
        """Watch ``path`` too; False if it cannot be watched (gone, or the watch limit hit)."""
        if path not in self.paths:
            assert _libc is not None
            if _libc.inotify_add_watch(self.fd, os.fsencode(path), _MASK) < 0:
                return False
            self.paths.add(path)
        return True

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True if a watched file changed (events consumed)."""
        if not self._poller.poll(max(timeout, 0.0) * 1000):
            return False
        # One read takes every queued event (each is 16 bytes plus a name this mask never
        # sets); any that arrive later make the next poll return at once, as they should.
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 65536)
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


# One instance per thread (instances are limited per user, 128 by default, so not one per
# file): a thread waits for one lock at a time, and a wake-up from another file it watched
# before only costs one extra attempt. The instance is closed when its thread ends.
_local = threading.local()


def watch(path: str) -> tuple[FileWatch | None, bool]:
    """This thread's watch including ``path``, and whether ``path`` was just added.

    None when inotify is unavailable. After a new watch the caller should retry before
    waiting, so that a release between its last attempt and the watch is not missed.
    """
    file_watch: FileWatch | None = getattr(_local, "watch", None)
    if file_watch is None:
        file_watch = FileWatch.open()
        if file_watch is None:
            return None, False
        _local.watch = file_watch
    new = path not in file_watch.paths
    if not file_watch.add(path):
        return None, False
    return file_watch, new


def _forget_after_fork() -> None:
    # The child shares the parent's inotify instance; reading it would steal the parent's events.
    _local.__dict__.pop("watch", None)


os.register_at_fork(after_in_child=_forget_after_fork)
