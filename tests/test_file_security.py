"""The file strategy against another local user: LOCK_DIR's owner, mode and links, planted and
hard-linked lock files, private records, and judged releases that spare a new holder.

The other user is the real ``nobody``: what it does runs in a process with its uid, gid and no
supplementary groups. Directories it must reach live in a fresh sticky folder in the temp dir
(pytest's own folders are private to root).
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from django_isolatable import AlreadyRunning, CommandIsolation, LockFileError, LockPermissionError
from django_isolatable.backends.base import BackendOptions, Lease
from django_isolatable.backends.file import FileBackend
from django_isolatable.conf import isolatable_settings
from django_isolatable.holders import new_record
from tests.processes import ROOT, Worker, Workers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as user nobody")

NAME = "nightly_report"
NOBODY = pwd.getpwnam("nobody").pw_uid
FIX = (
    'point settings.ISOLATABLE["LOCK_DIR"] (or BASE_DIR) at a directory that only this user can '
    "write"
)


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as user nobody (its own group, no supplementary groups)."""
    return subprocess.run(
        command, user="nobody", group="nogroup", extra_groups=[], capture_output=True, text=True
    )


def unsafe_dir_message(path: Path, reason: str) -> str:
    return (
        f"LOCK_DIR {path} {reason}, so other users could remove or replace its lock files; {FIX}."
    )


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A fresh root-owned sticky folder, like /tmp: every user may create things in it."""
    directory = Path(tempfile.mkdtemp(prefix="isolatable-shared-"))
    directory.chmod(0o1777)
    yield directory
    shutil.rmtree(directory)


def default_lock_dir(temp_dir: Path) -> Path:
    """The default LOCK_DIR of this suite's settings (no BASE_DIR) for a process as root."""
    return temp_dir / f"django-isolatable-{pwd.getpwuid(os.geteuid()).pw_name}-tests.settings"


TRY_DEFAULT = """\
import django, sys; django.setup()
from django_isolatable import CommandIsolation, LockPermissionError
try:
    CommandIsolation(sys.argv[1]).try_lock().release()
except LockPermissionError as e:
    print("refused", e.path, e, sep="\\n")
else:
    print("taken")
"""


def try_with_default_lock_dir(temp_dir: Path) -> list[str]:
    """Lock NAME in a new process whose settings leave LOCK_DIR to its default in ``temp_dir``."""
    result = subprocess.run(
        [sys.executable, "-c", TRY_DEFAULT, NAME],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "TMPDIR": str(temp_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


class TestLockDir:
    def test_default_made_by_another_user_is_refused(self, shared_tmp):
        """nobody made the default folder (mode 0o777): it could unlink a held lock file and let
        a second process in; the folder is refused, not used."""
        default = default_lock_dir(shared_tmp)
        assert as_nobody("mkdir", "-m", "777", str(default)).returncode == 0
        assert try_with_default_lock_dir(shared_tmp) == [
            "refused",
            str(default),
            unsafe_dir_message(default, f"belongs to another user (uid {NOBODY})"),
        ]
        assert list(default.iterdir()) == []

    @pytest.mark.parametrize("owner", ["nobody", "root"])
    def test_default_replaced_by_a_symlink_is_never_followed(self, shared_tmp, owner):
        """nobody's symlink at the default path, to its own folder or to a root-owned one (as
        /etc would be): no lock file is made there."""
        target = shared_tmp / "target"
        if owner == "nobody":
            assert as_nobody("mkdir", "-m", "700", str(target)).returncode == 0
        else:
            target.mkdir(mode=0o755)
        default = default_lock_dir(shared_tmp)
        assert as_nobody("ln", "-s", str(target), str(default)).returncode == 0
        assert try_with_default_lock_dir(shared_tmp) == [
            "refused",
            str(default),
            unsafe_dir_message(default, "is a symbolic link"),
        ]
        assert list(target.iterdir()) == []

    def test_writable_by_others_without_the_sticky_bit_is_refused(self, lock_dir):
        lock_dir.mkdir()
        lock_dir.chmod(0o777)
        with pytest.raises(LockPermissionError) as caught:
            CommandIsolation(NAME).try_lock()
        assert caught.value.path == lock_dir
        assert str(caught.value) == unsafe_dir_message(
            lock_dir, "is writable by other users and not sticky (drwxrwxrwx)"
        )
        lock_dir.chmod(0o1777)  # sticky, like /tmp: others cannot remove or rename our files
        CommandIsolation(NAME).try_lock().release()

    def test_manage_py_check_reports_it(self, shared_tmp, lock_dir):
        unsafe = shared_tmp / "theirs"
        assert as_nobody("mkdir", "-m", "700", str(unsafe)).returncode == 0
        (messages,) = [FileBackend.check_settings(BackendOptions(lock_dir=unsafe, ttl=60))]
        assert [(m.id, m.msg) for m in messages] == [
            (
                "isolatable.E012",
                unsafe_dir_message(unsafe, f"belongs to another user (uid {NOBODY})"),
            )
        ]
        assert FileBackend.check_settings(BackendOptions(lock_dir=lock_dir, ttl=60)) == []

    def test_swapped_for_a_symlink_after_the_check_is_not_followed(self, lock_dir, tmp_path):
        """The folder is checked once per backend; after that, lock files are opened relative
        to its descriptor, so a symlink put in its place later is never followed."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        isolation = CommandIsolation("first")
        isolation.try_lock().release()
        lock_dir.rename(tmp_path / "moved")
        lock_dir.symlink_to(elsewhere)
        with pytest.raises(LockPermissionError) as caught:
            CommandIsolation("second").try_lock()  # a new backend checks again: refused
        assert str(caught.value) == unsafe_dir_message(lock_dir, "is a symbolic link")
        with pytest.raises(LockPermissionError):  # the first backend notices it too
            isolation.backend.acquire("second", new_record("second", "file"))
        assert list(elsewhere.iterdir()) == []


class TestLockFiles:
    def test_a_hard_link_to_another_file_is_never_written(self, lock_dir, tmp_path):
        lock_dir.mkdir()
        victim = tmp_path / "victim"
        victim.write_text("precious")
        path = lock_dir / f"{NAME}.lock"
        os.link(victim, path)
        with pytest.raises(LockFileError) as caught:
            CommandIsolation(NAME).try_lock()
        assert str(caught.value) == (
            f"Lock file {path} has 2 hard links, so its record would be written into another "
            "file; remove it so locks can use that name."
        )
        assert victim.read_text() == "precious"

    def test_a_file_planted_by_another_user_is_never_written(self, shared_tmp):
        """In a sticky LOCK_DIR (allowed, like /tmp) nobody plants the lock file, readable by
        all: root must not take the lock and write its record (token, argv) into it."""
        path = shared_tmp / f"{NAME}.lock"
        assert as_nobody("sh", "-c", f"umask 022 && touch {path}").returncode == 0
        with pytest.raises(LockPermissionError) as caught:
            CommandIsolation(NAME, lock_dir=shared_tmp).try_lock()
        assert caught.value.path == path
        assert str(caught.value) == (
            f"Lock file {path} belongs to another user (uid {NOBODY}), so its record is never "
            f"written there; remove it, or {FIX}."
        )
        assert path.read_bytes() == b""
        assert path.stat().st_uid == NOBODY

    def test_an_existing_readable_file_is_made_private_before_the_record(self, shared_tmp):
        """A lock file left with mode 0o644 would show the holder's argv to every local user."""
        lock_dir = shared_tmp / "locks"
        lock_dir.mkdir(mode=0o755)
        path = lock_dir / f"{NAME}.lock"
        path.touch()
        path.chmod(0o644)
        backend = FileBackend(BackendOptions(lock_dir=lock_dir, ttl=60))
        record = dataclasses.replace(
            new_record(NAME, "file"), argv=("manage.py", "sync", "--password", "hunter2")
        )
        lease = backend.acquire(NAME, record)
        assert lease is not None
        try:
            assert "hunter2" in path.read_text()
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            seen = as_nobody("cat", str(path))
            assert seen.returncode != 0
            assert "hunter2" not in seen.stdout
        finally:
            backend.release(lease)


@pytest.fixture
def spawn(lock_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers = Workers(tmp_path, NAME, lock_dir)
    yield workers.start
    workers.close()


def file_backend(lock_dir: Path) -> FileBackend:
    return FileBackend(BackendOptions(lock_dir=lock_dir, ttl=60))


class TestJudgedReleases:
    def test_force_release_by_token_spares_a_holder_that_came_since(self, spawn, lock_dir):
        """`locks release --stale --force` judged holder A; B took the lock before the release
        came: the release by A's token must leave B's lock and file alone."""
        backend = file_backend(lock_dir)
        first = spawn("hold")
        _pid, first_token = first.expect("held")
        judged = (backend.inspect(NAME) or [None])[0]
        assert judged is not None
        assert judged.token == first_token
        first.finish()
        second = spawn("hold")
        second_pid, second_token = second.expect("held")
        inode = (lock_dir / f"{NAME}.lock").stat().st_ino

        assert backend.force_release(NAME, token=first_token) is False
        assert (lock_dir / f"{NAME}.lock").stat().st_ino == inode
        with pytest.raises(AlreadyRunning) as caught:
            CommandIsolation(NAME).try_lock()
        assert caught.value.holder.pid == int(second_pid)

        assert backend.force_release(NAME, token=second_token) is True  # its own token: removed
        assert not (lock_dir / f"{NAME}.lock").exists()
        second.finish()

    def test_force_release_by_token_of_a_free_lock_blanks_only_that_record(self, lock_dir):
        backend = file_backend(lock_dir)
        lock_dir.mkdir()
        record = new_record(NAME, "file")
        path = lock_dir / f"{NAME}.lock"
        path.write_text(record.to_json())
        path.chmod(0o600)
        assert backend.force_release(NAME, token="someone else's") is False
        assert path.read_text() == record.to_json()
        assert backend.force_release(NAME, token=record.token) is True
        assert path.read_text().strip() == ""
        assert backend.force_release(NAME, token=record.token) is False

    @pytest.mark.parametrize("content", [b"{corrupt", b'{"pid": 5}', b"[" * 60_000])
    def test_a_free_lock_with_an_unreadable_record_is_released_as_stale(
        self, spawn, lock_dir, content
    ):
        """Free under flock is stale whatever the record says: a release with no token (the
        record had none) clears it; while someone holds the flock it is refused."""
        backend = file_backend(lock_dir)
        lock_dir.mkdir()
        path = lock_dir / f"{NAME}.lock"
        path.write_bytes(content)
        path.chmod(0o600)
        info = (backend.inspect(NAME) or [None])[0]
        assert info is not None
        assert (info.alive, info.token) == (False, None)
        holder = spawn("hold")
        holder.expect("held")
        path.write_bytes(content)  # the live holder's record, corrupted
        assert backend.release(Lease(NAME, "", info)) is False
        assert path.read_bytes() == content
        holder.finish()
        path.write_bytes(content)
        assert backend.release(Lease(NAME, "", info)) is True
        assert path.read_bytes().strip() == b""


def test_a_deeply_nested_record_is_an_unknown_holder(lock_dir):
    """60,000 ``[`` overflow the JSON parser's recursion: read as an unknown record."""
    lock_dir.mkdir()
    hashed = "report:" + "q" * 300
    for name in (NAME, hashed):
        path = CommandIsolation(name).lock_path()
        path.write_bytes(b"[" * 60_000)
        path.chmod(0o600)
    holder = CommandIsolation(NAME).holder()
    assert holder is not None
    assert (holder.pid, holder.alive) == (None, False)
    listed = list(file_backend(lock_dir).list())
    assert [info.name for info in listed] == [NAME]  # the hashed one cannot be named
    for name in (NAME, hashed):
        with CommandIsolation(name).try_lock() as guard:
            assert CommandIsolation(name).holder().token == guard.info.token


def test_the_default_lock_dir_is_named_after_the_effective_user(settings, monkeypatch):
    """Not after USER or LOGNAME, which a process of another user may have inherited: it would
    make this user's folder (its own, which this user then refuses)."""
    settings.ISOLATABLE = {}
    for variable in ("USER", "LOGNAME", "LNAME", "USERNAME"):
        monkeypatch.setenv(variable, "nobody")
    assert isolatable_settings.LOCK_DIR == default_lock_dir(Path(tempfile.gettempdir()))


def test_release_if_stale_clears_a_free_lock_with_a_corrupt_record(lock_dir):
    """What `locks release --stale` does: the kernel says nobody holds it, so it is stale."""
    lock_dir.mkdir()
    path = CommandIsolation(NAME).lock_path()
    path.write_bytes(b"{corrupt")
    path.chmod(0o600)
    assert CommandIsolation(NAME).release_if_stale() is True
    assert path.read_bytes().strip() == b""
    assert CommandIsolation(NAME).holder() is None
