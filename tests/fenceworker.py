"""A worker process for tests/test_fence.py: one holder that fences and writes in transactions
it is told to open and commit, so a test can interleave two holders' transactions exactly.

Run as ``python -m tests.fenceworker`` with ``DJANGO_SETTINGS_MODULE=tests.settings``
(``tests.processes.Worker(..., module="tests.fenceworker")``); ``FENCE_TEST_DATABASES`` in the
environment (JSON, alias: settings) adds database aliases. It prints ``ready``, then reads one
command a line from stdin and answers each with one event line on stdout:

``begin ALIAS``
    Open ``transaction.atomic(using=ALIAS)``; ``begun <the server's id of the connection>``.
``write TABLE VALUE``
    Insert a row ``VALUE`` into ``TABLE`` in the open transaction; ``wrote VALUE``.
``fence NAME TOKEN``
    ``fence()`` a stand-in guard of lock ``NAME`` with fencing token ``TOKEN`` in the open
    transaction; ``fenced TOKEN``, or, on ``LockLost``, the transaction is rolled back (the
    error leaves the atomic block) and ``lost <the newer token>``.
``commit``
    Leave the atomic block; ``committed``.
``once ALIAS NAME TOKEN``
    ``begin``, ``fence`` and ``commit`` in one go: ``fenced TOKEN`` or ``lost <newer token>``.

Any other error is reported as ``error <type> <message>`` (and rolls the transaction back).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from types import SimpleNamespace

import django


def stand_in(name: str, token: int) -> SimpleNamespace:
    """A minimal stand-in for a ``LockGuard``: only what fence() reads (tests/test_fence.py)."""
    return SimpleNamespace(
        isolation=SimpleNamespace(name=name, strategy="test"), fencing_token=token
    )


def report(*words: object) -> None:
    print(*words, flush=True)


CONNECTION_ID = {"postgresql": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}


def main() -> None:
    django.setup()
    from django.db import connections, transaction

    from django_isolatable import LockLost, fence

    for alias, config in json.loads(os.environ.get("FENCE_TEST_DATABASES", "{}")).items():
        connections.settings[alias] = config
    transactions = contextlib.ExitStack()
    alias = "default"
    report("ready")
    for line in sys.stdin:
        command, *args = line.split()
        try:
            if command == "begin":
                (alias,) = args
                transactions.enter_context(transaction.atomic(using=alias))
                connection = connections[alias]
                with connection.cursor() as cursor:
                    cursor.execute(CONNECTION_ID.get(connection.vendor, "SELECT 0"))
                    report("begun", cursor.fetchone()[0])
            elif command == "write":
                table, value = args
                with connections[alias].cursor() as cursor:
                    cursor.execute(f"INSERT INTO {table} (value) VALUES (%s)", [value])
                report("wrote", value)
            elif command == "fence":
                name, token = args
                fence(stand_in(name, int(token)), using=alias)
                report("fenced", token)
            elif command == "commit":
                transactions.close()
                report("committed")
            elif command == "once":
                alias, name, token = args
                with transaction.atomic(using=alias):
                    fence(stand_in(name, int(token)), using=alias)
                report("fenced", token)
            else:
                break
        except LockLost as lost:
            transactions.__exit__(type(lost), lost, lost.__traceback__)  # rolls back
            report("lost", lost.newer_fencing_token)
        except Exception as error:
            transactions.__exit__(type(error), error, error.__traceback__)
            report("error", type(error).__name__, str(error).replace("\n", " "))


if __name__ == "__main__":
    main()
