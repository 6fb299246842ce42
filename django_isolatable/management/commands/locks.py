"""``manage.py locks status|release``: see what runs, clear what is stale.

Every release goes by the owner token of the holder it judged, at the moment of release: a lock
that another process took between the look and the release is reported and left alone. Names,
hosts and command lines come from the store, so they are shown through ``printable``.

Django's common options (``-v``, ``--no-color``, ``--settings``...) are taken before or after the
subcommand: each subcommand's parser gets a copy of every one that ``create_parser`` adds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from functools import cached_property
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_isolatable.backends import Backend, backend_for
from django_isolatable.command import duration
from django_isolatable.errors import IsolationError
from django_isolatable.holders import LockInfo, judged, printable, utcnow
from django_isolatable.isolation import release_stale

logger = logging.getLogger(__name__)

COLUMNS = ("NAME", "STATE", "PID", "HOST", "STARTED (UTC)", "AGE", "COMMAND")
#: The column that ``-v 2`` adds before COMMAND.
TOKEN = "TOKEN"
#: The column added after TOKEN (verbosity 2) when a holder was issued a fencing token.
FENCING = "FENCING"
#: The column added before COMMAND when a holder has a label.
LABEL = "LABEL"
#: The column added before COMMAND when a holder is not a plain lock's (shared, semaphore).
MODE = "MODE"
ELLIPSIS = "\u2026"


def state_of(info: LockInfo | None) -> str:
    """``held``, ``stale`` (holder proven dead or lease expired) or ``free``."""
    if info is None:
        return "free"
    return "stale" if info.alive is False else "held"


def _age(info: LockInfo) -> float | None:
    return None if info.acquired_at is None else (utcnow() - info.acquired_at).total_seconds()


class Command(BaseCommand):
    help = "Show and release the locks of isolated commands."
    # No system checks: a problem elsewhere in the project must not hide the locks, and a bad
    # ISOLATABLE setting or a missing driver is one CommandError line when the backend is made.
    requires_system_checks: tuple[str, ...] = ()

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        self._base_arguments: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_base_argument(self, parser: CommandParser, *args: Any, **kwargs: Any) -> None:
        """Django's common option, remembered for the subcommands (all but ``--version``)."""
        super().add_base_argument(parser, *args, **kwargs)
        if kwargs.get("action") != "version":
            self._base_arguments.append((args, dict(kwargs)))

    def add_arguments(self, parser: CommandParser) -> None:
        strategy_help = 'Lock strategy to look at (default: settings.ISOLATABLE["STRATEGY"]).'
        parser.add_argument("--strategy", help=strategy_help)
        actions = parser.add_subparsers(dest="action", required=True, metavar="{status,release}")
        status = actions.add_parser("status", help="Show locks: held, stale or free.")
        release = actions.add_parser(
            "release", help="Release locks whose holders are dead (or any, with --force)."
        )
        for subparser in (status, release):
            # SUPPRESS: a subcommand's parser writes all its values over those parsed before
            # it, so it must have none of its own for an option it was not given.
            subparser.add_argument("--strategy", help=strategy_help, default=argparse.SUPPRESS)
            for names, options in self._base_arguments:
                subparser.add_argument(*names, **{**options, "default": argparse.SUPPRESS})
        status.add_argument("names", nargs="*", metavar="NAME", help="Only these locks.")
        status.add_argument("--json", action="store_true", help="Print a JSON list.")
        status.add_argument(
            "--wide", action="store_true", help="Never cut the table to the terminal's width."
        )
        release.add_argument("names", nargs="*", metavar="NAME")
        release.add_argument("--stale", action="store_true", help="Release every stale lock.")
        release.add_argument("--all", action="store_true", help="Release every lock (--force).")
        release.add_argument(
            "--force",
            action="store_true",
            help="Also release locks whose holders are alive or cannot be judged.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.strategy = options["strategy"]
        self.verbosity = int(options["verbosity"])
        try:
            if self.verbosity >= 2 and not options.get("json"):
                store = self.backend.store()
                where = "" if store == self.backend.strategy else f" ({printable(store)})"
                self.stdout.write(f"Locks of the {self.backend.strategy} strategy{where}:")
            if options["action"] == "status":
                self.status(options["names"], as_json=options["json"], wide=options["wide"])
            else:
                self.release(options["names"], options["stale"], options["all"], options["force"])
        except (IsolationError, ImproperlyConfigured) as e:
            raise CommandError(printable(str(e))) from e

    @cached_property
    def backend(self) -> Backend:
        return backend_for(self.strategy)

    def holders(self, names: list[str]) -> list[tuple[str, LockInfo | None]]:
        """One ``(name, holder)`` per holder (a semaphore or a shared lock has several), and
        ``(name, None)`` for a named lock that has none."""
        if "" in names:
            raise CommandError("A lock name must not be empty.")
        if names:
            found: list[tuple[str, LockInfo | None]] = []
            for name in names:
                holders: list[LockInfo | None] = [*self.holders_of(name)]
                found.extend((name, info) for info in holders or [None])
            return found
        return [(info.name, judged(info)) for info in self.backend.list()]

    def holders_of(self, name: str) -> list[LockInfo]:
        return [judged(info) for info in self.backend.inspect(name)]

    def say(self, message: str, style_func: Any = None) -> None:
        """Write a line that is neither the table, the JSON nor an error: not at ``-v 0``."""
        if self.verbosity > 0:
            self.stdout.write(message, style_func)

    def status(self, names: list[str], *, as_json: bool, wide: bool) -> None:
        holders = self.holders(names)
        strategy = self.backend.strategy
        if as_json:
            # ensure_ascii: exact JSON that any stdout can carry, lone surrogates included.
            self.stdout.write(json.dumps([_as_json(n, i, strategy) for n, i in holders], indent=2))
            return
        if not holders:
            self.say(f"No locks ({strategy} strategy).")
            return
        header: tuple[str, ...] = COLUMNS
        rows = [_row(name, info) for name, info in holders]
        extra: list[tuple[str, Callable[[LockInfo | None], str]]] = []
        if self.verbosity >= 2:
            extra.append((TOKEN, _token))
            if any(info is not None and info.fencing_token for _, info in holders):
                extra.append((FENCING, _fencing))
        if any(info is not None and info.label for _, info in holders):
            extra.append((LABEL, _label))
        if any(info is not None and info.mode != "exclusive" for _, info in holders):
            extra.append((MODE, _mode))
        for column, cell in extra:
            header = (*header[:-1], column, header[-1])
            rows = [
                (*row[:-1], cell(info), row[-1])
                for row, (_, info) in zip(rows, holders, strict=True)
            ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
        # Cut to a terminal's width, or to COLUMNS when that is set; a pipe or a file gets
        # whole lines, for grep and for scripts.
        cut = not wide and (self.stdout.isatty() or "COLUMNS" in os.environ)
        width = shutil.get_terminal_size().columns if cut else None
        self.stdout.write(_line(header, widths, width), self.style.MIGRATE_HEADING)
        styles = {"held": self.style.WARNING, "stale": self.style.ERROR, "free": self.style.SUCCESS}
        for row in rows:
            self.stdout.write(_line(row, widths, width), styles[row[1]])

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
                self.say("No stale locks." if stale else "No locks.")
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
            self.say(f"{shown} is not locked{self._held_under(name)}.")
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
            if holder.alive is False and release_stale(self.backend, name):
                self.say(f"Released stale lock {shown} ({who}).", self.style.SUCCESS)
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
            self.say(f"Released stale lock {shown} ({who}).", self.style.SUCCESS)
        else:
            logger.warning("Force-released lock %s (%s)", shown, self.backend.strategy)
            self.say(
                f"Force-released {shown} ({who}); if that process still runs, it runs on "
                "without the lock.",
                self.style.WARNING,
            )
        return True

    def _not_released(self, name: str, judged_holder: LockInfo) -> bool:
        """Report why the holder judged earlier was not released; True if that is no failure
        (the lock is free now)."""
        shown = printable(name)
        holders = self.holders_of(name)
        now = next((h for h in holders if h.token == judged_holder.token), None)
        if now is None and not holders:
            self.say(f"{shown} is not locked.")
            return True
        if now is None:
            if judged_holder.mode != "exclusive":  # one holder of several left meanwhile
                self.say(f"{shown}: the holder {_who(judged_holder)} is gone already.")
                return True
            now = holders[0]
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

    def _held_under(self, name: str) -> str:
        """``"; held: import:a, import:b (release them by name)"`` for the held locks named
        ``name:...`` (``get_isolation_id`` suffixes), or ``""``: one listing, asked for only
        when ``name`` itself is not locked."""
        if self.verbosity == 0:
            return ""
        try:
            held = sorted(
                {info.name for info in self.backend.list() if info.name.startswith(name + ":")}
            )
        except NotImplementedError:  # a backend that cannot list its locks
            return ""
        if not held:
            return ""
        return f"; held: {', '.join(printable(n) for n in held)} (release them by name)"


def _line(cells: Iterable[str], widths: list[int], width: int | None) -> str:
    """The cells padded to their column's width; a line longer than ``width`` (when given) is
    cut to it, its last character an ellipsis."""
    *fixed, last = cells
    line = "  ".join(cell.ljust(size) for cell, size in zip(fixed, widths, strict=True))
    line += "  " + last
    if width is not None and len(line) > width:
        return line[: max(width - 1, 0)] + ELLIPSIS
    return line


def _token(info: LockInfo | None) -> str:
    if info is None:
        return "-"
    return "?" if info.token is None else printable(info.token)


def _mode(info: LockInfo | None) -> str:
    if info is None:
        return "-"
    return info.mode if info.mode != "semaphore" else f"{info.mode} of {info.max_holders}"


def _fencing(info: LockInfo | None) -> str:
    return "-" if info is None or info.fencing_token is None else str(info.fencing_token)


def _label(info: LockInfo | None) -> str:
    return "-" if info is None or not info.label else printable(info.label)


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
            "label": None,
            "mode": None,
            "fencing_token": None,
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
        "label": info.label,
        "mode": info.mode,
        "fencing_token": info.fencing_token,
    }
