"""IsolatableCommand: a management command that never overlaps itself."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper
from django.core.management.color import color_style, no_style

from django_isolatable.backends import LockStrategy
from django_isolatable.conf import isolatable_settings
from django_isolatable.errors import (
    AlreadyRan,
    AlreadyRunning,
    IsolationError,
    LockLost,
    LockTimeout,
    describe_holder,
)
from django_isolatable.holders import LockInfo, printable, utcnow
from django_isolatable.isolation import SETTINGS_MAX_AGE, CommandIsolation, LockGuard

#: Signals that end a running command the normal way: finally blocks run, the lock is released.
UNWIND_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Seconds between plain progress lines while waiting, when stderr is not a terminal.
PLAIN_PROGRESS_EVERY = 10.0


class Interrupted(BaseException):
    """Raised in the main thread when SIGTERM, SIGINT or SIGHUP arrives during a run.

    A BaseException, like KeyboardInterrupt, so ``except Exception`` in ``handle()`` does not
    swallow it; ``finally`` blocks and context managers still run.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class _Exit(Exception):
    """Internal: why the run stopped is already written; only the exit status is left."""

    def __init__(self, status: int) -> None:
        self.status = status


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {value!r}")
    return seconds


def positive_seconds(value: str) -> float:
    """An option's value in seconds > 0 (``--once-per``, ``locks status --watch``)."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {value!r}")
    return seconds


def _exit_status(value: str) -> int:
    if not value.isdigit() or int(value) > 255:
        raise argparse.ArgumentTypeError(f"expected an exit status from 0 to 255, got {value!r}")
    return int(value)


def plain(text: str) -> str:
    """A style function that leaves text as it is (stderr's default style is red)."""
    return text


def duration(seconds: float) -> str:
    """``42s``, ``3m 07s``, ``2h 05m``: how long, for people."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


class IsolatableCommand(BaseCommand):
    """A management command that runs at most once at a time.

    Subclass it and implement ``handle()``. The lock name is ``isolation_name`` (default: the
    command's own name) plus ``:<id>`` when ``get_isolation_id()`` returns one. A run that finds
    the lock held is skipped (one line on stderr, exit status ``--isolated-exit-code``) unless
    it was told to ``--wait``; from ``call_command()`` the ``AlreadyRunning`` propagates.
    """

    isolation_name: str | None = None
    isolation_timeout: float | None = 0
    isolation_strategy: LockStrategy | str | None = None
    #: Seconds after which a holder is overdue (None: settings ``MAX_AGE``): a run skipped
    #: because of an overdue holder logs an error and exits with ``OVERDUE_EXIT_CODE``.
    isolation_max_age: float | None = None
    #: Seconds of a period in which at most one run may succeed (None: no periods; the CLI's
    #: ``--once-per SECONDS`` overrides it). A later run in the period is skipped; a run that
    #: raised or exited non-zero leaves the period open.
    isolation_once_per: float | None = None
    #: How many runs may hold the lock at once (a semaphore; every user of the name must agree).
    isolation_max_holders: int = 1
    #: The held lock while ``handle()`` runs: ``self.isolation_guard.check()`` raises
    #: ``LockLost`` if an expiring lease was lost, for long jobs that want to stop early.
    isolation_guard: LockGuard | None = None

    def get_isolation_id(self, *args: Any, **options: Any) -> str | None:
        """A suffix that makes runs with different arguments independent (``import:customers``)."""
        return None

    def get_isolation_name(self, *args: Any, **options: Any) -> str:
        """The lock name of this run."""
        base = self.isolation_name or type(self).__module__.rsplit(".", 1)[-1]
        suffix = self.get_isolation_id(*args, **options)
        return base if suffix is None else f"{base}:{suffix}"

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        group = parser.add_argument_group("isolation")
        group.add_argument(
            "--wait",
            nargs="?",
            type=_seconds,
            const=math.inf,
            default=None,
            dest="isolation_wait",
            metavar="SECONDS",
            help="If another copy is running, wait for it (forever, or up to SECONDS) instead "
            "of skipping this run.",
        )
        group.add_argument(
            "--isolated-exit-code",
            type=_exit_status,
            default=None,
            metavar="N",
            help="Exit status of a run skipped because another copy is running "
            '(default: settings.ISOLATABLE["SKIPPED_EXIT_CODE"], 0).',
        )
        group.add_argument(
            "--once-per",
            type=positive_seconds,
            default=None,
            dest="isolation_once_per",
            metavar="SECONDS",
            help="Run at most once per period of SECONDS (aligned to the Unix epoch on the "
            "lock store's clock): skip this run if a run in this period succeeded already.",
        )
        return parser

    def run_from_argv(self, argv: list[str]) -> None:
        try:
            super().run_from_argv(argv)
        except _Exit as e:
            sys.exit(e.status)

    def execute(self, *args: Any, **options: Any) -> str | None:
        self._set_up_output(options)
        self.isolation_guard = None
        from_cli = getattr(self, "_called_from_command_line", False)
        name = self.get_isolation_name(*args, **options)
        max_age = SETTINGS_MAX_AGE if self.isolation_max_age is None else self.isolation_max_age
        once_per = options.get("isolation_once_per") or self.isolation_once_per
        isolation = CommandIsolation(
            name,
            strategy=self.isolation_strategy,
            max_age=max_age,
            once_per=once_per,
            max_holders=self.isolation_max_holders,
        )
        wait = options.get("isolation_wait")
        timeout = self.isolation_timeout if wait is None else None if wait == math.inf else wait
        with self._unwinding_signals(from_cli, name):
            try:
                guard = isolation.lock(timeout, progress=self._progress(options, name))
            except AlreadyRunning as e:
                if not from_cli:
                    raise
                raise _Exit(self._report_not_run(e, options)) from e
            except (IsolationError, ImproperlyConfigured) as e:
                if not from_cli:
                    raise
                raise CommandError(f"Could not take the lock {printable(name)}: {e}") from e
            finally:
                self._end_progress_line()
            self.isolation_guard = guard
            try:
                with guard:
                    result: str | None = super().execute(*args, **options)
            except LockLost as e:  # handle() called guard.check() and stopped
                if not from_cli:
                    raise
                self.stderr.write(f"{e} Stopped.", self.style.ERROR)
                raise _Exit(1) from e
        if guard.lost:
            message = str(LockLost(name))
            if not from_cli:
                raise CommandError(message, returncode=1)
            self.stderr.write(message, self.style.ERROR)
            raise _Exit(1)
        return result

    def _set_up_output(self, options: dict[str, Any]) -> None:
        # What BaseCommand.execute does first, needed earlier: a skipped run must honour
        # call_command(stderr=...) and --no-color before handle() is ever reached.
        if options.get("force_color"):
            self.style = color_style(force_color=True)
        elif options.get("no_color"):
            self.style = no_style()
            self.stderr.style_func = None
        if options.get("stdout"):
            self.stdout = OutputWrapper(options["stdout"])
        if options.get("stderr"):
            self.stderr = OutputWrapper(options["stderr"])

    def _report_not_run(self, error: AlreadyRunning, options: dict[str, Any]) -> int:
        """Write why this run did not happen; return its exit status."""
        if error.overdue_age is not None:
            self.stderr.write(
                f"{printable(error.command)} has been running for {duration(error.overdue_age)} "
                f"({describe_holder(error.holder)}), longer than its maximum age; skipped. "
                "Is it hung? See `manage.py locks status`.",
                self.style.ERROR,
            )
            return isolatable_settings.OVERDUE_EXIT_CODE
        if isinstance(error, LockTimeout):
            self.stderr.write(str(error), self.style.ERROR)
            return 1
        status = options.get("isolated_exit_code")
        if status is None:
            status = isolatable_settings.SKIPPED_EXIT_CODE
        if isinstance(error, AlreadyRan):
            if options.get("verbosity", 1) > 0:
                self.stderr.write(
                    f"{printable(error.command)} already ran in this period ({error.ran()}); "
                    "skipped.",
                    self.style.WARNING,
                )
            return int(status)
        if options.get("verbosity", 1) > 0:
            self.stderr.write(f"{error.running()}; skipped.", self.style.WARNING)
        return int(status)

    def _progress(self, options: dict[str, Any], name: str) -> Any:
        if options.get("verbosity", 1) == 0:
            return None
        live = self.stderr.isatty()
        self._progress_line = False
        last_plain = -math.inf

        def report(waited: float, holder: LockInfo | None) -> None:
            nonlocal last_plain
            held_for = ""
            if holder is not None and holder.acquired_at is not None:
                running = (utcnow() - holder.acquired_at).total_seconds()
                held_for = f", running for {duration(running)}"
            line = (
                f"Waiting for {printable(name)} ({describe_holder(holder)}{held_for}); "
                f"waited {duration(waited)}"
            )
            if live:
                self.stderr.write(f"\r\033[K{line}", plain, ending="")
                self.stderr.flush()
                self._progress_line = True
            elif time.monotonic() - last_plain >= PLAIN_PROGRESS_EVERY:
                self.stderr.write(line + ".", plain)
                last_plain = time.monotonic()

        return report

    def _end_progress_line(self) -> None:
        if getattr(self, "_progress_line", False):
            self.stderr.write("\r\033[K", ending="")
            self.stderr.flush()
            self._progress_line = False

    @contextmanager
    def _unwinding_signals(self, from_cli: bool, name: str) -> Iterator[None]:
        """From the command line, turn SIGTERM/SIGINT/SIGHUP into ``Interrupted`` and exit
        128+signal after unwinding; previous handlers are restored afterwards."""
        if not from_cli or threading.current_thread() is not threading.main_thread():
            yield
            return

        def interrupt(signum: int, frame: FrameType | None) -> None:
            raise Interrupted(signum)

        previous = {signum: signal.signal(signum, interrupt) for signum in UNWIND_SIGNALS}
        try:
            yield
        except Interrupted as e:
            self._end_progress_line()
            held = self.isolation_guard is not None
            outcome = "its lock is released" if held else "it never held the lock"
            self.stderr.write(f"{printable(name)} {e}; stopped, {outcome}.", self.style.ERROR)
            raise _Exit(128 + e.signum) from e
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
