"""Run a Django management command at most once at a time."""

from importlib.metadata import PackageNotFoundError, version

from django_isolatable.backends import LockStrategy
from django_isolatable.command import IsolatableCommand
from django_isolatable.decorators import current_guard, isolated
from django_isolatable.errors import (
    AlreadyRan,
    AlreadyRunning,
    IsolationError,
    LockFileError,
    LockIOError,
    LockLost,
    LockPermissionError,
    LockTimeout,
)
from django_isolatable.fencing import fence
from django_isolatable.holders import LockInfo
from django_isolatable.isolation import CommandIsolation, LockGuard

try:
    __version__ = version("django-isolatable")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
del PackageNotFoundError, version  # not names of this package

__all__ = [
    "AlreadyRan",
    "AlreadyRunning",
    "CommandIsolation",
    "IsolatableCommand",
    "IsolationError",
    "LockFileError",
    "LockGuard",
    "LockIOError",
    "LockInfo",
    "LockLost",
    "LockPermissionError",
    "LockStrategy",
    "LockTimeout",
    "current_guard",
    "fence",
    "isolated",
]
