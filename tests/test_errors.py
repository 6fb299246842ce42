"""The error hierarchy: attributes, one-sentence messages, pickling."""

from __future__ import annotations

import pickle
from datetime import datetime, timezone
from pathlib import Path

import pytest

from django_isolatable import (
    AlreadyRan,
    AlreadyRunning,
    IsolationError,
    LockFileError,
    LockInfo,
    LockIOError,
    LockLost,
    LockPermissionError,
    LockTimeout,
)
from django_isolatable.errors import UnsafeLockLocation

HOLDER = LockInfo(
    name="import_data",
    strategy="file",
    token="abc",
    pid=4242,
    hostname="web-1",
    acquired_at=datetime(2026, 11, 28, 15, 30, 1, tzinfo=timezone.utc),
)


def test_hierarchy():
    assert issubclass(LockTimeout, AlreadyRunning)
    assert issubclass(UnsafeLockLocation, LockPermissionError)
    for error in (AlreadyRunning, LockFileError, LockPermissionError, LockIOError, LockLost):
        assert issubclass(error, IsolationError)


def test_already_running():
    error = AlreadyRunning("import_data", HOLDER)
    assert error.command == "import_data"
    assert error.holder is HOLDER
    assert error.locked_at == HOLDER.acquired_at
    assert str(error) == (
        "import_data is already running (pid 4242 on web-1 since 2026-11-28 15:30:01 UTC); "
        "see `manage.py locks status import_data`."
    )


def test_already_running_with_unknown_holder():
    error = AlreadyRunning("x")
    assert error.holder is None
    assert error.locked_at is None
    assert "(holder unknown)" in str(error)


def test_lock_timeout():
    error = LockTimeout("import_data", HOLDER, 2.5)
    assert error.timeout == 2.5
    assert str(error) == (
        "Gave up waiting for import_data after 2.5 s: it is still running (pid 4242 on web-1 "
        "since 2026-11-28 15:30:01 UTC); wait longer or see `manage.py locks status import_data`."
    )


def test_permission_error_names_the_path_and_setting():
    error = LockPermissionError("/var/lock/app")
    assert error.path == Path("/var/lock/app")
    assert 'settings.ISOLATABLE["LOCK_DIR"]' in str(error)
    assert "/var/lock/app" in str(error)


@pytest.mark.parametrize(
    "error",
    [
        AlreadyRunning("a", HOLDER),
        AlreadyRunning("a"),
        LockTimeout("b", HOLDER, 3.0),
        LockPermissionError(Path("/x")),
        UnsafeLockLocation(Path("/x"), "LOCK_DIR /x is a symbolic link; point it elsewhere."),
        LockFileError("bad place"),
        LockIOError("no network"),
        LockLost("c", HOLDER),
        LockLost("c", None, 7, 5),  # refused by fence()
        AlreadyRan("d", HOLDER, 3600.0, 491234),
        AlreadyRan("d"),
    ],
)
def test_errors_pickle(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.__dict__ == error.__dict__


def test_already_ran_names_the_run_that_used_the_period_and_the_next_period():
    error = AlreadyRan("import_data", HOLDER, 3600, 498_855)  # 2026-11-28 15:00 to 16:00 UTC
    assert isinstance(error, AlreadyRunning)
    assert (error.command, error.holder) == ("import_data", HOLDER)
    assert error.locked_at == HOLDER.acquired_at
    assert (error.period_seconds, error.period_index) == (3600.0, 498_855)
    assert error.next_period_at == datetime(2026, 11, 28, 16, 0, tzinfo=timezone.utc)
    assert str(error) == (
        "import_data already ran in this period (pid 4242 on web-1 at 2026-11-28 15:30:01 UTC); "
        "the next period begins at 2026-11-28 16:00:00 UTC."
    )
    assert "(by an unknown run)" in str(AlreadyRan("x"))
