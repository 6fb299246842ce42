"""LOCK_DIR of the file strategy, opened and checked once, relative to which lock files are
opened and checked, so that another local user cannot steer a lock: LOCK_DIR's owner, mode and
links, and each lock file's owner, links and mode.

A lock file's name, ``flock`` attempts and record are in ``backends/lockfile.py``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from django.core.checks import CheckMessage, Error

from django_isolatable.errors import (
    LockFileError,
    LockIOError,
    LockPermissionError,
    UnsafeLockLocation,
)

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a planted FIFO never hangs
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FIX = (
    'point settings.ISOLATABLE["LOCK_DIR"] (or BASE_DIR) at a directory that only this user can '
    "write"
)


def check(lock_dir: Path) -> list[CheckMessage]:
    """The system check's errors for LOCK_DIR: it is no directory, it is unsafe
    (``directory_problem``), or this user cannot write it (or, while it is missing, the parent
    it would be made in)."""
    setting = f'settings.ISOLATABLE["LOCK_DIR"] ({str(lock_dir)!r})'
    if lock_dir.exists() and not lock_dir.is_dir():
        return [Error(f"{setting} is not a directory; point it at one.", id="isolatable.E010")]
    with contextlib.suppress(FileNotFoundError):
        problem = directory_problem(lock_dir, os.lstat(lock_dir))
        if problem is not None:
            return [Error(problem, id="isolatable.E012")]
    existing = next(p for p in (lock_dir, *lock_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        return [
            Error(
                f"{setting} is not writable by this user: {existing} denies it; make it "
                "writable or point the setting at a directory that is.",
                id="isolatable.E011",
            )
        ]
    return []


def directory_problem(lock_dir: Path, found: os.stat_result) -> str | None:
    """Why LOCK_DIR, as ``lstat`` or ``fstat`` found it, must not be used, or None if it may.

    Another user must not be able to remove or replace its lock files (a held lock's file
    unlinked lets a second holder in) nor point it elsewhere: so it is no symbolic link, it
    belongs to this user, and it is writable by nobody else unless sticky (as /tmp is).
    """
    if stat.S_ISLNK(found.st_mode):
        reason = "is a symbolic link"
    elif found.st_uid != os.geteuid():
        reason = f"belongs to another user (uid {found.st_uid})"
    elif found.st_mode & 0o022 and not found.st_mode & stat.S_ISVTX:
        reason = f"is writable by other users and not sticky ({stat.filemode(found.st_mode)})"
    else:
        return None
    return (
        f"LOCK_DIR {lock_dir} {reason}, so other users could remove or replace its lock files; "
        f"{_FIX}."
    )


class LockDirectory:
    """LOCK_DIR as a descriptor, opened and checked (``directory_problem``) on first use, and
    the lock files in it, opened relative to that descriptor: a symbolic link put in its place
    after the check is never followed. Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._prefix = os.path.join(path, "")
        self._fd = -1
        self._identity = (0, 0)  # st_dev, st_ino of the directory self._fd is
        # Descriptors of a LOCK_DIR that was replaced: another thread may still be opening a
        # file through one, so they are closed with this object, never while it is in use.
        self._retired: list[int] = []
        self._lock = threading.Lock()
        _directories.add(self)

    def __del__(
        self,
        close: Callable[[int], None] = os.close,
        suppress: type[contextlib.suppress] = contextlib.suppress,
    ) -> None:
        # Bound at definition: at interpreter exit this module's globals (contextlib, os) may
        # be gone already, and a decorated module-level function keeps its backend until then.
        for fd in (self._fd, *self._retired):
            if fd >= 0:
                with suppress(OSError):
                    close(fd)

    def fd(self, *, create: bool) -> int | None:
        """The checked descriptor; None if LOCK_DIR is missing (made, mode 0o700, first when
        ``create``). Raises ``UnsafeLockLocation``, ``LockFileError`` or
        ``LockPermissionError``."""
        fd = self._fd
        if fd < 0:
            with self._lock:
                if self._fd < 0:
                    opened = _open_directory(self.path, create=create)
                    if opened is not None:
                        found = os.fstat(opened)
                        self._fd, self._identity = opened, (found.st_dev, found.st_ino)
                fd = self._fd
        return None if fd < 0 else fd

    def recheck(self) -> bool:
        """True if LOCK_DIR's path no longer names the descriptor's directory (it was removed,
        moved aside or swapped for a link while this process ran): the next use opens and
        checks the path again."""
        with self._lock:
            if self._fd < 0:
                return False
            try:
                current = os.stat(self.path, follow_symlinks=False)
            except OSError:  # gone, or unreachable: opening it again says which
                pass
            else:
                if (current.st_dev, current.st_ino) == self._identity:
                    return False
            self._retired.append(self._fd)
            self._fd = -1
            return True

    def open(self, file: str, flags: int) -> tuple[int, os.stat_result]:
        """Open the lock file named ``file`` in the directory LOCK_DIR names now (never through
        a link, never blocking), checked with ``check_file``; its descriptor and stat.
        ``FileNotFoundError`` when it (or LOCK_DIR, unless creating) is missing."""
        path = self._prefix + file
        creating = bool(flags & os.O_CREAT)
        self.recheck()
        directory = self.fd(create=creating)
        if directory is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        try:
            fd = os.open(file, flags | _OPEN_FLAGS, 0o600, dir_fd=directory)
        except FileNotFoundError:
            raise  # no lock file: the caller's answer, not an error
        except OSError as e:
            raise os_error(e, path, self.path) from e
        opened = os.fstat(fd)
        try:
            check_file(fd, path, opened, writing=flags & os.O_ACCMODE != os.O_RDONLY)
        except BaseException:
            os.close(fd)
            raise
        return fd, opened


_directories: weakref.WeakSet[LockDirectory] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for directory in list(_directories):
        directory._lock = threading.Lock()  # another thread may have held it at fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def _open_directory(lock_dir: Path, *, create: bool) -> int | None:
    for attempt in range(2):
        try:
            fd = os.open(lock_dir, _DIR_FLAGS)
        except FileNotFoundError:
            if not create or attempt:
                return None
            _make_directory(lock_dir)
            continue
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP) and os.path.islink(lock_dir):
                problem = directory_problem(lock_dir, os.lstat(lock_dir))
                raise UnsafeLockLocation(lock_dir, str(problem)) from e
            raise os_error(e, str(lock_dir), lock_dir) from e
        problem = directory_problem(lock_dir, os.fstat(fd))
        if problem is not None:
            os.close(fd)
            raise UnsafeLockLocation(lock_dir, problem)
        return fd
    return None


def _make_directory(lock_dir: Path) -> None:
    """Make LOCK_DIR (mode 0o700) with a ``.gitignore`` of ``*`` in it, as pytest does for its
    cache folder, so the default ``BASE_DIR/.locks`` never shows up in a repository."""
    try:
        os.makedirs(lock_dir.parent, exist_ok=True)
        os.mkdir(lock_dir, 0o700)
    except FileExistsError as e:
        if os.path.isdir(lock_dir):
            return  # another process made it first
        raise os_error(OSError(errno.ENOTDIR, "Not a directory"), str(lock_dir), lock_dir) from e
    except OSError as e:
        raise os_error(e, str(lock_dir), lock_dir) from e
    try:
        fd = os.open(
            os.path.join(lock_dir, ".gitignore"),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    except OSError:
        return  # the locks work without it
    try:
        os.write(fd, b"# Lock files of django-isolatable.\n*\n")
    finally:
        os.close(fd)


def check_file(fd: int, path: str, opened: os.stat_result, *, writing: bool) -> None:
    """Refuse a lock file another user could read or steer; make one that is ours private.

    It must be a regular file with one link (a hard link to another file would get the record
    written into that file) that belongs to this user (a file another user planted in a sticky
    LOCK_DIR is theirs to read). Before a record is written, a file readable by others is made
    0o600: the record shows the holder's command line. Raises ``LockFileError`` or
    ``UnsafeLockLocation``, leaving the file as it was.
    """
    if not stat.S_ISREG(opened.st_mode):
        raise LockFileError(f"{path} is not a regular file; remove it so locks can use it.")
    if opened.st_nlink > 1:
        raise LockFileError(
            f"Lock file {path} has {opened.st_nlink} hard links, so its record would be written "
            "into another file; remove it so locks can use that name."
        )
    if opened.st_uid != os.geteuid():
        raise UnsafeLockLocation(
            path,
            f"Lock file {path} belongs to another user (uid {opened.st_uid}), so its record is "
            f"never written there; remove it, or {_FIX}.",
        )
    if writing and opened.st_mode & 0o077:
        try:
            os.fchmod(fd, 0o600)
        except OSError as e:
            raise os_error(e, path, Path(path).parent) from e


def os_error(e: OSError, path: str, lock_dir: Path) -> Exception:
    """The error to raise for ``e`` from opening a lock file or making LOCK_DIR: it names the
    path and the fix."""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LockPermissionError(lock_dir)
    if e.errno == errno.ELOOP:
        return LockFileError(
            f"{path} is a symbolic link; lock files never follow links, remove it."
        )
    if e.errno == errno.EISDIR:
        return LockFileError(f"{path} is a directory; remove it so locks can use that name.")
    if e.errno == errno.ENOTDIR:
        return LockFileError(
            f"LOCK_DIR {lock_dir} is not a directory; point "
            'settings.ISOLATABLE["LOCK_DIR"] at a directory.'
        )
    return LockIOError(f"Could not use lock file {path}: {e.strerror or e}.")
