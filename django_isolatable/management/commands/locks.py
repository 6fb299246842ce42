"""``manage.py locks status|release``: see what runs, clear what is stale.

Every release goes by the owner token of the holder it judged, at the moment of release: a lock
that another process took between the look and the release is reported and left alone. Names,
hosts and command lines come from the store, so they are shown through ``printable``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable
from functools import cached_property
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_isolatable.backends import Backend, backend_for
from django_isolatable.command import duration
from django_isolatable.errors import IsolationError
from django_isolatable.holders import LockInfo, judged, printable, utcnow
from django_isolatable.isolation import CommandIsolation

logger = logging.getLogger(__name__)

COLUMNS = ("NAME", "STATE", "PID", "HOST", "STARTED (UTC)", "AGE", "COMMAND")


def state_of(info: LockInfo | None) -> str:
    """``held``, ``stale`` (holder proven dead or lease expired) or ``free``."""
    if info is None:
        return "free"
    return "stale" if info.alive is False else "held"


def _age(info: LockInfo) -> float | None:
    return None if info.acquired_at is None else (utcnow() - info.acquired_at).total_seconds()


class Command(BaseCommand):
    help = "Show and release the locks of isolated commands."

    def add_arguments(self, parser: CommandParser) -> None:
        strategy_help = 'Lock strategy to look at (default: settings.ISOLATABLE["STRATEGY"]).'
        parser.add_argument("--strategy", help=strategy_help)
        actions = parser.add_subparsers(dest="action", required=True, metavar="{status,release}")
        status = actions.add_parser("status", help="Show locks: held, stale or free.")
        status.add_argument("--strategy", help=strategy_help, default=argparse.SUPPRESS)
        status.add_argument("names", nargs="*", metavar="NAME", help="Only these locks.")
        status.add_argument("--json", action="store_true", help="Print a JSON list.")
        release = actions.add_parser(
            "release", help="Release locks whose holders are dead (or any, with --force)."
        )
        release.add_argument("names", nargs="*", metavar="NAME")
        release.add_argument("--strategy", help=strategy_help, default=argparse.SUPPRESS)
        release.add_argument("--stale", action="store_true", help="Release every stale lock.")
        release.add_argument("--all", action="store_true", help="Release every lock (--force).")
        release.add_argument(
            "--force",
            action="store_true",
            help="Also release locks whose holders are alive or cannot be judged.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.strategy = options["strategy"]
        try:
            if options["action"] == "status":
                self.status(options["names"], as_json=options["json"])
            else:
                self.release(options["names"], options["stale"], options["all"], options["force"])
        except (IsolationError, ImproperlyConfigured) as e:
            raise CommandError(printable(str(e))) from e

    @cached_property
    def backend(self) -> Backend:
        return backend_for(self.strategy)

    def holders(self, names: list[str]) -> list[tuple[str, LockInfo | None]]:
        if "" in names:
            raise CommandError("A lock name must not be empty.")
        if names:
            return [(name, self.holder(name)) for name in names]
        return [(info.name, judged(info)) for info in self.backend.list()]

    def holder(self, name: str) -> LockInfo | None:
        info = self.backend.inspect(name)
        return None if info is None else judged(info)

    def status(self, names: list[str], *, as_json: bool) -> None:
        holders = self.holders(names)
        strategy = self.backend.strategy
        if as_json:
            # ensure_ascii: exact JSON that any stdout can carry, lone surrogates included.
            self.stdout.write(json.dumps([_as_json(n, i, strategy) for n, i in holders], indent=2))
            return
        if not holders:
            self.stdout.write(f"No locks ({strategy} strategy).")
            return
        rows = [_row(name, info) for name, info in holders]
        widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS) - 1)]
        self.stdout.write(self._line(COLUMNS, widths), self.style.MIGRATE_HEADING)
        styles = {"held": self.style.WARNING, "stale": self.style.ERROR, "free": self.style.SUCCESS}
        for row in rows:
            self.stdout.write(self._line(row, widths), styles[row[1]])

    @staticmethod
    def _line(cells: Iterable[str], widths: list[int]) -> str:
        *fixed, last = cells
        return "  ".join(cell.ljust(width) for cell, width in zip(fixed, widths, strict=True)) + (
            "  " + last
        )

    def release(self, names: list[str], stale: bool, every: bool, force: bool) -> None:
        if every and not force:
            raise CommandError("locks release --all releases live holders' locks too: add --force.")
        if not (names or stale or every):
            raise CommandError("Name the locks to release, or use --stale, or --all --force.")
        if names:
            targets = self.holders(names)
        else:
            targets = [(n, i) for n, i in self.holders([]) if every or state_of(i) == "stale"]
            if not targets:
                self.stdout.write("No stale locks." if stale else "No locks.")
        refused = 0
        for name, holder in targets:
            refused += not self._release_one(name, holder, force)
        if refused:
            raise CommandError(
                f"{refused} lock{'s were' if refused > 1 else ' was'} not released.", returncode=1
            )

    def _release_one(self, name: str, holder: LockInfo | None, force: bool) -> bool:
        """Release the lock ``holder`` holds, by its token; False if it was not released."""
        shown = printable(name)
        if holder is None:
            self.stdout.write(f"{shown} is not locked.")
            return True
        who = _who(holder)
        if holder.alive is not False and not force:
            judgement = "is alive" if holder.alive else "cannot be judged from this host"
            self.stderr.write(
                f"Not releasing {shown}: its holder ({who}) {judgement}. "
                "Use --force if you are sure it is not running.",
                self.style.ERROR,
            )
            return False
        if holder.token is None:  # nothing to release it by: it could be anyone's by now
            # Unless the store itself knows it is free (a file lock nobody holds with a record
            # that cannot be read), which release_if_stale checks again as it releases.
            if (
                holder.alive is False
                and CommandIsolation(name, strategy=self.strategy).release_if_stale()
            ):
                self.stdout.write(f"Released stale lock {shown} ({who}).", self.style.SUCCESS)
                return True
            self.stderr.write(
                f"Not releasing {shown}: its holder's record ({who}) has no owner token, so it "
                "cannot be released safely.",
                self.style.ERROR,
            )
            return False
        if not self.backend.force_release(name, token=holder.token):
            return self._not_released(name, holder)
        if holder.alive is False:
            logger.info("Released the stale lock %s of %s", shown, who)
            self.stdout.write(f"Released stale lock {shown} ({who}).", self.style.SUCCESS)
        else:
            logger.warning("Force-released lock %s (%s)", shown, self.backend.strategy)
            self.stdout.write(
                f"Force-released {shown} ({who}); if that process still runs, it runs on "
                "without the lock.",
                self.style.WARNING,
            )
        return True

    def _not_released(self, name: str, judged_holder: LockInfo) -> bool:
        """Report why the holder judged earlier was not released; True if that is no failure
        (the lock is free now)."""
        shown = printable(name)
        now = self.holder(name)
        if now is None:
            self.stdout.write(f"{shown} is not locked.")
            return True
        if now.token != judged_holder.token:
            self.stderr.write(
                f"{shown} now has another holder ({_who(now)}); not released.", self.style.ERROR
            )
        else:
            self.stderr.write(
                f"Could not release {shown} ({_who(now)}): the {self.backend.strategy} strategy "
                "kept it.",
                self.style.ERROR,
            )
        return False


def _who(info: LockInfo) -> str:
    return f"pid {info.pid if info.pid is not None else '?'} on {printable(info.hostname or '?')}"


def _row(name: str, info: LockInfo | None) -> tuple[str, ...]:
    if info is None:
        return (printable(name), "free", "-", "-", "-", "-", "")
    started = "-" if info.acquired_at is None else f"{info.acquired_at:%Y-%m-%d %H:%M:%S}"
    age = _age(info)
    return (
        printable(name),
        state_of(info),
        str(info.pid) if info.pid is not None else "?",
        printable(info.hostname or "?"),
        started,
        "-" if age is None else duration(age),
        printable(" ".join(info.argv)),
    )


def _as_json(name: str, info: LockInfo | None, strategy: str) -> dict[str, Any]:
    if info is None:
        return {
            "name": name,
            "strategy": strategy,
            "state": "free",
            "pid": None,
            "host": None,
            "started_at": None,
            "age_seconds": None,
            "command": None,
            "expires_at": None,
        }
    return {
        "name": name,
        "strategy": info.strategy,
        "state": state_of(info),
        "pid": info.pid,
        "host": info.hostname,
        "started_at": None if info.acquired_at is None else info.acquired_at.isoformat(),
        "age_seconds": _age(info),
        "command": " ".join(info.argv),
        "expires_at": None if info.expires_at is None else info.expires_at.isoformat(),
    }
