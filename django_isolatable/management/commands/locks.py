"""``manage.py locks status|release``: see what runs, clear what is stale.

Every release goes by the owner token of the holder it judged, at the moment of release: a lock
that another process took between the look and the release is reported and left alone. Names,
hosts and command lines come from the store, so they are shown through ``printable``.

Django's common options (``-v``, ``--no-color``, ``--settings``...) are taken before or after the
subcommand: each subcommand's parser gets a copy of every one that ``create_parser`` adds.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator
from functools import cached_property
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_isolatable import listing
from django_isolatable.backends import Backend, backend_for
from django_isolatable.command import duration, positive_seconds
from django_isolatable.errors import IsolationError
from django_isolatable.holders import LockInfo, judged, printable, utcnow
from django_isolatable.isolation import release_stale
from django_isolatable.listing import state_of as state_of

logger = logging.getLogger(__name__)
#: The cells of a row, as the admin's Locks page imports them from here.
_row, _label, _mode, _who = listing.row_of, listing.label_cell, listing.mode_cell, listing.who

#: What ``watch`` (procps) writes to clear a terminal: cursor home, erase the screen.
CLEAR = "\x1b[H\x1b[2J"


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
        status.add_argument(
            "--json",
            action="store_true",
            help="Print a JSON list (with --watch: one list per line, a line per draw).",
        )
        status.add_argument(
            "--older-than",
            type=listing.age_limit,
            metavar="DURATION",
            help="Only holders that have held their lock longer than DURATION "
            f"({listing.AGE_FORMS}); exit status 2 when any is listed, for monitoring checks.",
        )
        status.add_argument(
            "--watch",
            nargs="?",
            type=positive_seconds,
            const=2.0,
            metavar="SECONDS",
            help="Redraw every SECONDS (default 2) until interrupted (Ctrl-C). Put lock names "
            "before it, or write --watch=SECONDS.",
        )
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
                self.status(options["names"], options)
            else:
                self.release(options["names"], options["stale"], options["all"], options["force"])
        except (IsolationError, ImproperlyConfigured) as e:
            raise CommandError(printable(str(e))) from e

    @cached_property
    def backend(self) -> Backend:
        return backend_for(self.strategy)

    def holders(self, names: list[str]) -> Iterator[tuple[str, LockInfo | None]]:
        """One ``(name, holder)`` per holder (a semaphore or a shared lock has several), and
        ``(name, None)`` for a named lock that has none; streamed from the store's list()
        when no name is given."""
        if "" in names:
            raise CommandError("A lock name must not be empty.")
        if names:
            found: list[tuple[str, LockInfo | None]] = []
            for name in names:
                holders: list[LockInfo | None] = [*self.holders_of(name)]
                found.extend((name, info) for info in holders or [None])
            return iter(found)
        judge = listing.Judge()
        return ((info.name, judge(info)) for info in self.backend.list())

    def holders_of(self, name: str) -> list[LockInfo]:
        return [judged(info) for info in self.backend.inspect(name)]

    def say(self, message: str, style_func: Any = None) -> None:
        """Write a line that is neither the table, the JSON nor an error: not at ``-v 0``."""
        if self.verbosity > 0:
            self.stdout.write(message, style_func)

    def status(self, names: list[str], options: dict[str, Any]) -> None:
        limit: float | None = options["older_than"]
        try:
            if options["watch"] is not None:
                self.watch(names, options["watch"], options)
                return
            listed = self.draw(names, options, compact=False)
        except BrokenPipeError:  # the reader left (`| head`): stop there, as `cat` would
            listing.silence_stdout()
            return
        if listed and limit is not None:
            raise CommandError(
                f"{listed} lock holder{'s' if listed > 1 else ''} held longer than "
                f"{duration(limit)}.",
                returncode=2,
            )

    def draw(self, names: list[str], options: dict[str, Any], *, compact: bool) -> int:
        """Write the table or the JSON list once; the number of holders listed."""
        holders: listing.Holders = self.holders(names)
        limit: float | None = options["older_than"]
        if limit is not None:
            holders = listing.older_than(holders, limit)
        strategy = self.backend.strategy
        if options["json"]:
            return listing.write_json(self.stdout, holders, strategy, compact=compact)
        # Cut to a terminal's width, or to COLUMNS when that is set; a pipe or a file gets
        # whole lines, for grep and for scripts.
        cut = not options["wide"] and (self.stdout.isatty() or "COLUMNS" in os.environ)
        listed = listing.write_table(
            self.stdout,
            holders,
            styles={
                "held": self.style.WARNING,
                "stale": self.style.ERROR,
                "free": self.style.SUCCESS,
            },
            heading=self.style.MIGRATE_HEADING,
            verbosity=self.verbosity,
            width=listing.terminal_width() if cut else None,
        )
        if not listed:
            older = "" if limit is None else f" held longer than {duration(limit)}"
            self.say(f"No locks{older} ({strategy} strategy).")
        return listed

    def watch(self, names: list[str], interval: float, options: dict[str, Any]) -> None:
        """Draw every ``interval`` seconds until interrupted: on a terminal the screen is
        cleared first, on a pipe the draws follow each other after a blank line; with --json,
        one JSON list per line per draw. Ctrl-C ends it with status 0."""
        terminal = self.stdout.isatty()
        shown = " ".join(printable(name) for name in names)
        title = f"Every {interval:g}s: locks status {shown}".rstrip()
        between = CLEAR if terminal else ""
        try:
            while True:
                if not options["json"]:
                    self.stdout.write(between + f"{title}    {utcnow():%Y-%m-%d %H:%M:%S} UTC")
                    self.stdout.write("")
                    between = CLEAR if terminal else "\n"
                self.draw(names, options, compact=True)
                self.stdout.flush()
                time.sleep(interval)
        except KeyboardInterrupt:
            self.stdout.flush()

    def release(self, names: list[str], stale: bool, every: bool, force: bool) -> None:
        if every and not force:
            raise CommandError("locks release --all releases live holders' locks too: add --force.")
        if not (names or stale or every):
            raise CommandError("Name the locks to release, or use --stale, or --all --force.")
        if names:
            targets = list(self.holders(names))
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
            if self.verbosity:  # not at -v 0: the hint costs a listing
                self.say(f"{shown} is not locked{listing.held_under(self.backend, name)}.")
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
                f"{shown} now has another holder ({_who(now)}); not released.",
                self.style.ERROR,
            )
        else:
            self.stderr.write(
                f"Could not release {shown} ({_who(now)}): the {self.backend.strategy} strategy "
                "kept it.",
                self.style.ERROR,
            )
        return False
