"""The file strategy's own contract: safe file names, permissions, and every bad input."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from django_isolatable import (
    AlreadyRunning,
    CommandIsolation,
    LockFileError,
    LockPermissionError,
)
from django_isolatable.backends import heldfiles, lockfile
from django_isolatable.backends.file import file_name
from django_isolatable.holders import new_record
from tests.conformance import TRICKY_NAMES

ROOT = Path(__file__).parent.parent


def held_elsewhere(isolation: CommandIsolation):
    """Hold ``isolation`` in another process until the returned function is called."""
    script = (
        "import django, sys; django.setup()\n"
        "from django_isolatable import CommandIsolation\n"
        f"with CommandIsolation({isolation.name!r}, lock_dir={str(isolation.backend.lock_dir)!r})"
        ".lock(timeout=10):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "held\n"

    def release() -> None:
        process.communicate("", timeout=30)
        assert process.returncode == 0

    return release


class TestFileNames:
    def test_every_name_stays_inside_lock_dir_with_a_short_name(self, lock_dir):
        for name in [*TRICKY_NAMES, "/", "\\", "a/../../b", "\udcff", "\u202e", "x" * 5000]:
            path = CommandIsolation(name).lock_path()
            assert path is not None
            assert path.parent == lock_dir
            assert path.name.endswith(".lock")
            assert not path.name.startswith(".")
            assert len(os.fsencode(path.name)) <= 200
            assert "/" not in path.name
            assert "\0" not in path.name

    def test_names_never_collide(self):
        names = [*TRICKY_NAMES, "A", "a", "%41", "%2541", "~", "%7E", "x" * 299, "x" * 301]
        names += ["y" * 150 + suffix for suffix in ("a", "b", "%", "~")]
        files = [file_name(name) for name in names]
        assert len(set(files)) == len(set(names))

    def test_readable_where_it_can_be(self):
        assert file_name("migrate") == "migrate.lock"
        assert file_name("cache:clear") == "cache%3Aclear.lock"
        assert file_name("import/customers") == "import%2Fcustomers.lock"
        assert file_name("..") == "%2E..lock"

    def test_long_names_keep_a_readable_prefix_and_a_hash(self):
        name = file_name("report:" + "q" * 300)
        assert name.startswith("report%3Aqqq")
        assert "~" in name

    def test_lock_files_and_directory_are_private(self, lock_dir):
        with CommandIsolation("private").lock():
            assert stat.S_IMODE(lock_dir.stat().st_mode) & 0o077 == 0
            assert stat.S_IMODE((lock_dir / "private.lock").stat().st_mode) == 0o600

    def test_lock_file_holds_the_record_as_json_and_is_blanked_on_release(self, lock_dir):
        isolation = CommandIsolation("cat-me")
        with isolation.lock() as guard:
            record = json.loads((lock_dir / "cat-me.lock").read_text())
            assert record["token"] == guard.info.token
            assert record["pid"] == os.getpid()
            assert record["name"] == "cat-me"
        assert (lock_dir / "cat-me.lock").read_text().strip() == ""
        assert isolation.holder() is None

    def test_a_longer_leftover_record_is_cut_off_after_the_new_one(self, lock_dir):
        isolation = CommandIsolation("leftover")
        leftover = new_record("leftover", "file")
        leftover = dataclasses.replace(leftover, argv=("x" * 5000,), pid=1)
        lock_dir.mkdir(exist_ok=True)
        isolation.lock_path().write_text(leftover.to_json())
        for _ in range(2):  # the second time through the descriptor kept open since the first
            with isolation.lock() as guard:
                text = isolation.lock_path().read_text()
                assert json.loads(text)["token"] == guard.info.token
                assert len(text) < 2000
            assert isolation.lock_path().read_text().strip() == ""
            with open(isolation.lock_path(), "r+") as f:  # a dead holder's, written in place
                f.write(leftover.to_json())


class TestBadInput:
    def test_lock_dir_is_a_file(self, tmp_path):
        not_a_dir = tmp_path / "file"
        not_a_dir.write_text("keep me")
        with pytest.raises(LockFileError, match="not a directory"):
            CommandIsolation("x", lock_dir=not_a_dir).try_lock()
        with pytest.raises(LockFileError, match="not a directory"):
            CommandIsolation("x", lock_dir=not_a_dir / "sub").try_lock()
        assert not_a_dir.read_text() == "keep me"

    def test_missing_lock_dir_is_created(self, tmp_path):
        directory = tmp_path / "a" / "b"
        CommandIsolation("x", lock_dir=directory).try_lock().release()
        assert directory.is_dir()

    def test_planted_symlink_is_never_followed(self, lock_dir, tmp_path):
        lock_dir.mkdir()
        target = tmp_path / "precious"
        target.write_text("do not touch")
        (lock_dir / "victim.lock").symlink_to(target)
        with pytest.raises(LockFileError, match="symbolic link"):
            CommandIsolation("victim").try_lock()
        with pytest.raises(LockFileError, match="symbolic link"):
            CommandIsolation("victim").holder()
        assert target.read_text() == "do not touch"

    def test_planted_fifo_never_hangs(self, lock_dir):
        lock_dir.mkdir()
        os.mkfifo(lock_dir / "pipe.lock")
        with pytest.raises(LockFileError, match="not a regular file"):
            CommandIsolation("pipe").try_lock()

    @pytest.mark.parametrize(
        "content",
        [b"", b"{", b"[]", b"null", b'{"pid": "x", "acquired_at": 5}', b"\xff\xfe\x00garbage"],
    )
    def test_corrupt_record_never_crashes(self, lock_dir, content):
        lock_dir.mkdir()
        path = lock_dir / "corrupt.lock"
        path.write_bytes(content)
        isolation = CommandIsolation("corrupt")
        holder = isolation.holder()
        assert holder is None or (holder.pid is None and holder.alive is False)
        release = held_elsewhere(isolation)
        try:
            path.write_bytes(content)  # the holder's record, replaced by garbage
            holder = isolation.holder()
            if content:
                assert holder is not None
                assert holder.alive is True
                assert holder.pid is None
            else:  # an empty file reads as free: holders empty it before they unlock
                assert holder is None
            with pytest.raises(AlreadyRunning, match="holder unknown"):
                isolation.try_lock()
        finally:
            release()
        with isolation.lock(timeout=5) as guard:
            assert json.loads(path.read_text())["token"] == guard.info.token

    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_unwritable_lock_dir_is_a_permission_error(self):
        parent = Path(tempfile.mkdtemp(prefix="isolatable-readonly-"))
        directory = parent / "locks"
        directory.mkdir(mode=0o555)
        if os.geteuid() == 0:  # the user tried below (nobody) owns it, but may not write in it
            os.chown(directory, 65534, 65534)
        parent.chmod(0o755)
        # Read before the fork: as nobody, the child may not read the interpreter's own modules
        # (a Python installed under /root), which reading this process's identity imports.
        new_record("x", "file")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                if os.geteuid() == 0:  # root ignores file modes: try as an unprivileged user
                    os.setgid(65534)
                    os.setuid(65534)
                try:
                    CommandIsolation("x", lock_dir=directory).try_lock()
                    report = "no error"
                except LockPermissionError as e:
                    report = f"{type(e).__name__}|{e.path}|{e}"
                os.write(write_end, report.encode())
            finally:
                os._exit(0)
        os.close(write_end)
        try:
            with os.fdopen(read_end) as pipe:
                kind, path, message = pipe.read().split("|")
            os.waitpid(pid, 0)
        finally:
            shutil.rmtree(parent)
        assert kind == "LockPermissionError"
        assert path == str(directory)
        assert message == (
            f"No permission to create or open lock files in {directory}; make it writable for "
            'this user or point settings.ISOLATABLE["LOCK_DIR"] at a directory that is.'
        )

    def test_lock_dir_removed_while_held(self, lock_dir):
        isolation = CommandIsolation("vanishing")
        guard = isolation.lock()
        shutil.rmtree(lock_dir)  # the lock file and the .gitignore made with the folder
        guard.release()
        with isolation.lock(timeout=5):
            assert isolation.is_locked()

    def test_hand_deleted_lock_file_is_recreated(self, lock_dir):
        isolation = CommandIsolation("deleted")
        with isolation.lock():
            pass
        (lock_dir / "deleted.lock").unlink()
        assert isolation.holder() is None
        isolation.try_lock().release()


def test_leftover_record_of_a_dead_holder(lock_dir):
    """What a SIGKILL leaves: a free lock with a record; holder() says dead, lock() takes it."""
    isolation = CommandIsolation("leftover")
    with isolation.lock() as guard:
        record = (lock_dir / "leftover.lock").read_text()
    (lock_dir / "leftover.lock").write_text(record)
    holder = isolation.holder()
    assert holder is not None
    assert holder.token == guard.info.token
    assert holder.alive is False
    assert not isolation.is_locked()
    isolation.try_lock().release()
    assert isolation.holder() is None


def _open_lock_files(lock_dir: Path) -> list[str]:
    """The files under ``lock_dir`` this process has open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{lock_dir}/"):
            found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
class TestOpenLockFiles:
    """Free lock files stay open between acquisitions (no open() per lock), within bounds."""

    def test_taking_a_lock_again_reuses_its_descriptor(self, lock_dir):
        isolation = CommandIsolation("again")
        isolation.try_lock().release()
        assert _open_lock_files(lock_dir) == [str(lock_dir / "again.lock")]
        isolation.try_lock().release()
        assert _open_lock_files(lock_dir) == [str(lock_dir / "again.lock")]

    def test_open_lock_files_are_bounded(self, lock_dir):
        for i in range(3 * heldfiles.MAX_OPEN_FILES):
            CommandIsolation(f"tenant-{i}").try_lock().release()
        assert len(_open_lock_files(lock_dir)) <= heldfiles.MAX_OPEN_FILES

    def test_close_closes_free_lock_files_but_never_held_ones(self, lock_dir):
        CommandIsolation("free").try_lock().release()
        with CommandIsolation("held").lock() as guard:
            guard.isolation.backend.close()
            assert _open_lock_files(lock_dir) == [str(lock_dir / "held.lock")]
            with pytest.raises(AlreadyRunning):
                CommandIsolation("held").try_lock()
        assert CommandIsolation("held").holder() is None

    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_a_forked_child_never_locks_through_the_parents_descriptor(self, lock_dir):
        """The child shares the parent's open file descriptions, whose flock the parent holds:
        it must open its own, or it would 'take' the parent's lock."""
        isolation = CommandIsolation("forked")
        isolation.try_lock().release()  # the parent's descriptor is now kept open
        with isolation.lock():
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports through the pipe
                try:
                    try:
                        CommandIsolation("forked").try_lock()
                        report = "taken"
                    except AlreadyRunning:
                        report = "already running"
                    os.write(write_end, report.encode())
                finally:
                    os._exit(0)
            os.close(write_end)
            with os.fdopen(read_end) as pipe:
                report = pipe.read()
            os.waitpid(pid, 0)
            assert report == "already running"
            assert isolation.is_locked()

    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_a_fork_while_lock_dir_is_being_checked_never_hangs_the_child(self, lock_dir):
        """A thread may be checking LOCK_DIR (its lock held) at the instant another forks: the
        child must not wait forever for a lock whose holder it does not have."""
        isolation = CommandIsolation("forked-dir")
        isolation.try_lock().release()
        with isolation.backend._directory._lock:  # as that other thread would hold it
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports through its exit status
                try:
                    isolation.try_lock().release()
                finally:
                    os._exit(0)
        exited = os.pidfd_open(pid)
        try:
            hung = not select.select([exited], [], [], 30)[0]
        finally:
            os.close(exited)
        if hung:
            os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        assert not hung, "the forked child hung"
        assert status == 0

    def test_an_interrupted_acquire_leaves_the_file_unlocked(self, lock_dir, monkeypatch):
        """An exception between the flock and the lease (here while writing the record) must
        not leave the kept-open descriptor holding the kernel lock."""
        isolation = CommandIsolation("interrupted")
        isolation.try_lock().release()

        def interrupted(*args):
            raise KeyboardInterrupt

        monkeypatch.setattr(lockfile, "write_record", interrupted)
        with pytest.raises(KeyboardInterrupt):
            isolation.try_lock()
        monkeypatch.undo()
        fd = os.open(isolation.lock_path(), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free for anyone
        finally:
            os.close(fd)
        isolation.try_lock().release()

    def test_force_release_of_a_lock_this_process_holds(self, lock_dir):
        """release_all() unlinks a held file; the next holder locks a new one, and the old
        guard's release later touches neither the new file nor its descriptor."""
        isolation = CommandIsolation("forced")
        old = isolation.lock()
        assert isolation.release_all()
        new = isolation.try_lock()
        old.release()
        assert isolation.is_locked()
        assert json.loads(isolation.lock_path().read_text())["token"] == new.info.token
        new.release()
        assert not isolation.is_locked()
        isolation.try_lock().release()


def test_a_new_lock_dir_gets_a_gitignore_and_an_existing_one_is_left_alone(tmp_path):
    """The default LOCK_DIR is BASE_DIR/.locks, inside the project: a folder the file strategy
    makes ignores itself in git, as pytest's cache folder does. One made by someone else is not
    written into."""
    made = tmp_path / "project" / ".locks"
    CommandIsolation("job", lock_dir=made).try_lock().release()
    assert (made / ".gitignore").read_text().splitlines()[-1] == "*"
    assert [i.name for i in CommandIsolation("job", lock_dir=made).backend.list()] == []
    existing = tmp_path / "mine"
    existing.mkdir(mode=0o700)
    CommandIsolation("job", lock_dir=existing).try_lock().release()
    assert not (existing / ".gitignore").exists()


def test_git_ignores_a_new_lock_dir(tmp_path):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    subprocess.run([git, "init", "-q", str(tmp_path)], check=True)
    CommandIsolation("job", lock_dir=tmp_path / ".locks").try_lock().release()
    status = subprocess.run(
        [git, "status", "--porcelain", "--untracked-files=all"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert status.stdout == ""
