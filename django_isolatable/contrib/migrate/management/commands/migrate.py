"""``manage.py migrate``, at most once at a time per database, each run waiting for the last."""

from __future__ import annotations

from typing import Any

from django.core.management.commands import migrate
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper

from django_isolatable.command import IsolatableCommand


def _in_memory(connection: BaseDatabaseWrapper) -> bool:
    """True for an in-memory SQLite database, which no other process can open."""
    name = connection.settings_dict["NAME"]
    return (
        connection.vendor == "sqlite"
        and isinstance(name, str)
        and (name == ":memory:" or "mode=memory" in name)
    )


class Command(IsolatableCommand, migrate.Command):
    """Django's ``migrate`` under the lock ``migrate:<database NAME>``.

    A run that finds the lock held waits for it (``isolation_timeout = None``), so each replica
    of a deploy returns only once the schema is ready; ``--wait SECONDS`` bounds the wait (a
    wait that times out exits 1) and ``--wait 0`` skips at once with ``--isolated-exit-code``.
    The lock is per database NAME: a test run migrates its test database, whose NAME Django
    has changed by then, without waiting for a ``migrate`` of the development database.
    Migrating an in-memory SQLite database takes no lock: no other process can reach it.
    """

    help = migrate.Command.help + " Runs at most once at a time per database, waiting for a run "
    help += "in progress."
    isolation_name = "migrate"
    isolation_timeout = None

    def get_isolation_id(self, *args: Any, **options: Any) -> str:
        """The NAME of the database that ``--database`` names (its alias if NAME is empty)."""
        alias = options.get("database") or DEFAULT_DB_ALIAS
        name = connections[alias].settings_dict["NAME"]
        return str(name) if name else alias

    def execute(self, *args: Any, **options: Any) -> str | None:
        if _in_memory(connections[options.get("database") or DEFAULT_DB_ALIAS]):
            # Past IsolatableCommand.execute: Django's migrate, unlocked.
            return super(IsolatableCommand, self).execute(*args, **options)
        return super().execute(*args, **options)
