"""Semaphores and shared holds of the file strategy: holder files beside a name's lock file.

Every semaphore or shared holder of a name holds its lock file with a shared ``flock`` (one per
process, ``heldfiles.SharedHold``), so a plain holder's exclusive one excludes them all, and
holds one holder file, ``<lock file>+<slot>``, exclusively, with its record in it. A semaphore
of N takes the first free of slots 0 to N-1, so at most N hold it; a shared holder takes the
first free slot of any number. An exclusive locker that waits holds the gate file,
``<lock file>+gate``, exclusively, and a shared holder passes the gate (a shared ``flock`` for
an instant) before it takes the lock file: writer preference. The kernel frees every ``flock``
of a dead process; the record it leaves in a holder file is stale (free under ``flock``) until a
later holder takes that slot or a stale release empties it. ``+`` is always escaped in lock
files' names, so no lock file, nor another lock's holder file, has a holder file's name.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from django_isolatable.backends import heldfiles, lockdir, lockfile
from django_isolatable.backends.base import Lease, holder_count_mismatch
from django_isolatable.backends.lockfile import file_name
from django_isolatable.holders import MAX_HOLDERS, LockInfo

if TYPE_CHECKING:
    from django_isolatable.backends.file import FileBackend, FileLease


def take(
    backend: FileBackend, name: str, info: LockInfo, slots: int, *, gated: bool
) -> FileLease | None:
    """One attempt to hold ``name`` shared plus one of ``slots`` holder files (``gated``: not
    while an exclusive locker waits); None when it cannot now. Raises ``holder_count_mismatch``
    for a semaphore whose holders on the way recorded another count."""
    main_file = file_name(name)
    main = backend._dir + main_file

    def lock(entry: heldfiles.OpenFile) -> bool:
        return lockfile.hold_shared(entry.fd, main, name) and entry.stat_if_at(main) is not None

    gate = backend._dir + lockfile.gate_file(main_file) if gated else None
    hold = heldfiles.join(main, gate, backend._open_new, lock)
    if hold is None:
        return None
    try:
        slot, lease = _take_slot(backend, name, info, slots)
    except BaseException:
        heldfiles.leave(hold)
        raise
    if lease is None:
        heldfiles.leave(hold)
        return None
    lease.hold = hold  # from here on, releasing the lease leaves the hold
    if info.mode == "semaphore":
        _check_later_slots(backend, name, slot + 1, lease)
    return lease


def _take_slot(
    backend: FileBackend, name: str, info: LockInfo, slots: int
) -> tuple[int, FileLease | None]:
    """The first free of ``slots`` holder files of ``name``, taken: its slot and lease (None
    if none was taken, or another kind of holder is in the way)."""
    main_file = file_name(name)
    for slot in range(slots):
        path = backend._dir + lockfile.holder_file(main_file, slot)
        if not _claim(path):  # a thread of this process holds it
            if not _may_pass(heldfiles.holder(path), info):
                break
            continue
        lease, passing = None, True
        try:
            lease = backend._lock(name, path, info)
            entry = heldfiles.kept(path)
            if lease is None and entry is not None:
                passing = _may_pass(lockfile.read_record(entry.fd, name), info)
        finally:
            heldfiles.settle(path, None if lease is None else info)
        if lease is not None:
            return slot, lease
        if not passing:
            break
    return slots, None


#: Seconds an attempt waits for another thread of its process that is in the middle of taking a
#: slot or looking at it: that thread's claim says nothing yet about whether the slot is free.
IN_FLIGHT = 0.05


def _claim(path: str) -> bool:
    """Claim the holder file ``path``; False if a thread of this process holds it. A claim of
    another thread that has no record yet (it is taking the slot, or a holder of a slot below
    is looking at this one) is waited for a moment, never taken for a holder."""
    deadline = time.monotonic() + IN_FLIGHT
    while not heldfiles.claim(path):
        if heldfiles.holder(path) is not None or time.monotonic() >= deadline:
            return False
        time.sleep(0.0002)
    return True


def _check_later_slots(backend: FileBackend, name: str, first: int, lease: FileLease) -> None:
    """Raise ``holder_count_mismatch`` (``lease`` released) if a live holder of a slot from
    ``first`` on recorded another count: slots are taken lowest first, so a holder that asked
    for more slots may sit above the one just taken. Up to the first slot with no file (a slot
    has one once a holder took it)."""
    info, main_file = lease.info, file_name(name)
    for slot in range(first, MAX_HOLDERS):
        path = backend._dir + lockfile.holder_file(main_file, slot)
        if not heldfiles.claim(path):
            record = heldfiles.holder(path)  # this process's: alive
        else:
            try:
                record = _live_record(backend, name, path)
            except FileNotFoundError:
                return
            finally:
                heldfiles.settle(path, None)
        if record and record.mode == "semaphore" and record.max_holders != info.max_holders:
            backend.release(lease)
            raise holder_count_mismatch(name, record.max_holders, info.max_holders)


def _live_record(backend: FileBackend, name: str, path: str) -> LockInfo | None:
    """The record in the holder file ``path`` (claimed) if a live holder holds it, else None.
    ``FileNotFoundError`` if there is no such file."""
    entry = heldfiles.kept(path)
    if entry is not None:
        fd = entry.fd
    else:
        file, directory = path[len(backend._dir) :], backend._directory.fd(create=False)
        os.stat(file, dir_fd=directory, follow_symlinks=False)  # cheaper than a failing open
        fd, _ = backend._directory.open(file, os.O_RDONLY)
    try:
        record = lockfile.read_record(fd, name)
        if record is None or lockfile.try_flock(fd, path, shared=True):
            return None  # blank, or free: a dead holder's
        return record
    finally:
        if entry is None:
            os.close(fd)


def _may_pass(holder: LockInfo | None, info: LockInfo) -> bool:
    """Whether an attempt for ``info`` may go on past a slot that ``holder`` holds: not past
    another kind of holder (semaphore and shared holds do not mix); raises
    ``holder_count_mismatch`` past a semaphore's holder that recorded another count."""
    if holder is None or holder.token is None:  # writing its record, or unreadable
        return True
    if holder.mode != info.mode:
        return False
    if holder.mode == "semaphore" and holder.max_holders != info.max_holders:
        raise holder_count_mismatch(info.name, holder.max_holders, info.max_holders)
    return True


def holder_files(backend: FileBackend, main_file: str) -> list[str]:
    """The holder files of the lock file ``main_file`` that exist, by slot."""
    if backend._directory.fd(create=False) is None:  # checked: refused if unsafe
        return []
    prefix = main_file + lockfile.SEPARATOR
    try:  # by path: a scan of the descriptor would share its position with other threads'
        with os.scandir(backend.lock_dir) as entries:
            found = [
                (int(entry.name[len(prefix) :]), entry.name)
                for entry in entries
                if entry.name.startswith(prefix)
                and _is_slot(entry.name[len(prefix) :])
                and entry.is_file(follow_symlinks=False)  # as list() does: a link is none
            ]
    except FileNotFoundError:
        return []
    except OSError as e:
        raise lockdir.os_error(e, str(backend.lock_dir), backend.lock_dir) from e
    return [file for _, file in sorted(found)]


def _is_slot(text: str) -> bool:
    """Whether ``text`` is a slot number as ``lockfile.holder_file`` writes it."""
    return text.isascii() and text.isdigit() and len(text) <= 5 and text == str(int(text))


def group(entries: list[str]) -> dict[str, list[str]]:
    """Lock files' names (the keys) with their holder files, by slot, from a listing of
    LOCK_DIR; gate files and other names are left out."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for entry in entries:
        main_file, separator, slot = entry.partition(lockfile.SEPARATOR)
        if not main_file.endswith(lockfile.SUFFIX):
            continue
        if not separator:
            groups.setdefault(main_file, [])
        elif _is_slot(slot):
            groups.setdefault(main_file, []).append((int(slot), entry))
    return {main: [file for _, file in sorted(files)] for main, files in sorted(groups.items())}


def records(backend: FileBackend, name: str, files: list[str]) -> Iterator[LockInfo]:
    """The records in holder files ``files`` of ``name``, live or stale (blank ones left out)."""
    for file in files:
        record = backend._read(name, file)
        if record is not None:
            yield record


def clear_stale(backend: FileBackend, lease: Lease) -> bool:
    """Empty the record of a dead semaphore or shared holder in a holder file of
    ``lease.name``, if ``lease.token`` is still the one recorded there, never while anyone
    holds that file's ``flock``."""
    for file in holder_files(backend, file_name(lease.name)):
        if lockfile.clear_if_stale(backend._directory, file, lease.name, lease.token):
            return True
    return False


def force_release(backend: FileBackend, name: str, token: str | None) -> tuple[bool, int]:
    """``force_release`` for the holder files of ``name``: records of free ones emptied, live
    holders' files unlinked (with ``token``: only that holder's). Whether something was
    released, and how many live holders are left."""
    released, left = False, 0
    for file in holder_files(backend, file_name(name)):
        outcome = lockfile.force_release(backend._directory, file, name, token)
        released = released or outcome is True
        left += outcome is None
    return released, left
