"""Fencing: a holder's writes commit only while no newer holder of its lock has recorded its
fencing token (Martin Kleppmann's fencing tokens, checked where the data lives).

``fence(guard)`` records the guard's token for its lock name in the caller's own transaction,
in the table ``django_isolatable_fence`` of that database (``backends/fencetable.py``), and
raises ``LockLost`` if a greater token was recorded already. The stored token only ever grows,
and its row stays locked until the caller's transaction ends: a stale holder that fences while
a newer one's transaction is open waits for it, then sees its token.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from django.db import connections

from django_isolatable.conf import isolatable_settings
from django_isolatable.errors import IsolationError, LockLost
from django_isolatable.holders import printable

if TYPE_CHECKING:
    from django_isolatable.isolation import LockGuard

logger = logging.getLogger(__name__)


def fence(guard: LockGuard, *, using: str = "default") -> None:
    """Record ``guard.fencing_token`` for its lock in the current transaction of database
    ``using``, so that the writes of a holder whose lock was taken since never commit.

    Call it inside the ``transaction.atomic(using=using)`` block that makes the writes, best
    first: its row lock then orders the holders' transactions. Calling it twice with one token
    is fine.

    Raises ``LockLost`` (``newer_fencing_token`` set) if a greater token was recorded for the
    name: let it leave the atomic block, which rolls the writes back. Raises
    ``IsolationError`` outside a transaction or for a guard without a fencing token,
    ``LockIOError`` if the table is missing and cannot be made, and the database's own
    ``DatabaseError`` if the statement fails (the transaction must then be rolled back).
    """
    name = guard.isolation.name
    token = getattr(guard, "fencing_token", None)  # the strategies' LockGuard.fencing_token
    if not isinstance(token, int) or isinstance(token, bool):
        raise IsolationError(
            f"Lock {printable(name)} has no fencing token: its {guard.isolation.strategy} "
            "strategy does not issue them (see docs/fencing.md)."
        )
    connection = connections[using]
    if connection.get_autocommit():
        raise IsolationError(
            f"fence() for {printable(name)} must run in the transaction that makes the writes "
            f"it protects, and database {using!r} is in autocommit mode: call it inside "
            f"`with transaction.atomic(using={using!r}):`."
        )
    # Not at import time: the table's model needs the app registry.
    from django_isolatable.backends import dbtable, fencetable

    key = dbtable.name_hash(isolatable_settings.KEY_PREFIX, name)
    stored = fencetable.record(connection, using, key, name, token)
    if stored > token:
        logger.warning(
            "Fenced out of %s: a newer holder fenced token %d, this one has %d",
            name,
            stored,
            token,
            extra={"lock_name": name, "fencing_token": token},
        )
        from django_isolatable.isolation import LockGuard

        if isinstance(guard, LockGuard):  # anything with the two attributes may be fenced
            guard._mark_lost("to a newer holder, which fenced its token")
        raise LockLost(name, None, stored, token)
