"""Locks for a project's tests: the memory strategy, a fresh namespace, waits that end.

``isolated_locks()`` (a context manager, and a decorator for functions and ``unittest`` /
Django test classes) and the pytest fixture ``isolatable_locks`` point the app at the memory
strategy under a ``KEY_PREFIX`` of their own, so a test never meets the locks of a run on the
same machine (a development server, a cron job, another test run) nor those a previous test
left behind. See docs/testing.md.

The pytest fixture is registered by the ``pytest11`` entry point of the package, or by
``pytest_plugins = ["django_isolatable.testing"]``; this module imports pytest only if it is
installed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings
from django.test.utils import TestContextDecorator, override_settings

from django_isolatable.backends import options_from_settings
from django_isolatable.backends.memory import MemoryBackend
from django_isolatable.holders import LockInfo

#: Default of ``CommandIsolation.lock()`` inside ``isolated_locks()``, in seconds: long enough
#: for a lock another thread of the test holds to be handed over, short enough that a test
#: waiting on a lock nobody will release fails with ``LockTimeout`` instead of hanging.
TEST_TIMEOUT = 5.0


@dataclass(frozen=True)
class IsolatedLocks:
    """The namespace of one ``isolated_locks()`` block: its ``key_prefix`` and its locks."""

    key_prefix: str

    def held(self) -> list[LockInfo]:
        """The holders of this namespace's locks now, sorted by name."""
        options = replace(options_from_settings(), key_prefix=self.key_prefix)
        return sorted(MemoryBackend(options).list(), key=lambda info: info.name)

    def is_locked(self, name: str) -> bool:
        """True while someone in this process holds the lock ``name`` of this namespace."""
        return any(info.name == name for info in self.held())


class isolated_locks(TestContextDecorator):
    """Point ``settings.ISOLATABLE`` at the memory strategy with a fresh ``KEY_PREFIX`` and a
    ``TIMEOUT`` of ``timeout`` seconds (default ``TEST_TIMEOUT``), and restore it afterwards.

    As a context manager it gives the block's ``IsolatedLocks``. As a decorator of a function
    (coroutine functions too) each call, and of a ``unittest.TestCase`` class each test, gets a
    namespace of its own. The other ``ISOLATABLE`` keys stay as the project set them.
    ``CommandIsolation`` objects and commands that name a strategy of their own
    (``strategy=``, ``isolation_strategy``) keep it.
    """

    def __init__(self, *, timeout: float | None = TEST_TIMEOUT) -> None:
        super().__init__()
        self.timeout = timeout
        self._overrides: list[override_settings] = []

    def enable(self) -> IsolatedLocks:
        locks = IsolatedLocks(f"isolated-locks-{uuid.uuid4().hex}:")
        current = getattr(settings, "ISOLATABLE", {})
        override = override_settings(
            ISOLATABLE={
                **(current if isinstance(current, dict) else {}),
                "STRATEGY": "memory",
                "KEY_PREFIX": locks.key_prefix,
                "TIMEOUT": self.timeout,
            }
        )
        override.enable()
        self._overrides.append(override)  # a stack: one decorator may be re-entered
        return locks

    def disable(self) -> None:
        self._overrides.pop().disable()

    def __enter__(self) -> IsolatedLocks:  # type: ignore[override]  # the stubs say Apps
        return self.enable()

    def __exit__(self, *exc_info: Any) -> None:
        self.disable()


try:
    import pytest
except ImportError:  # unittest users need no pytest
    pass
else:

    @pytest.fixture
    def isolatable_locks() -> Iterator[IsolatedLocks]:
        """The test runs inside ``isolated_locks()``; the fixture's value is its namespace."""
        with isolated_locks() as locks:
            yield locks
