"""Uncontended acquire+release: one process takes a free lock and releases it, over and over.

Each group's first row is the raw limit: the least a lock of that kind can cost. Batches of the
rows of a group are interleaved in random order, so a noisy moment of the machine lands on all
of them alike and the ratios stay comparable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connections
from django.utils import timezone

from benchmarks import environment, placement
from benchmarks.report import Group, Row, median, percentile, print_table, ratio

Operation = Callable[[], object]
OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC


@dataclass(frozen=True)
class Subject:
    label: str
    #: Builds the operation (opening what it needs, closed by the stack) in the measuring process.
    make: Callable[[contextlib.ExitStack], Operation]
    #: Servers and peers it needs (see ``environment.unavailable``).
    needs: tuple[str, ...] = ()


def _must(taken: object) -> None:
    if not taken:
        raise RuntimeError("an uncontended lock was not free")


def raw_flock(stack: contextlib.ExitStack) -> Operation:
    fd = os.open(environment.work_file("raw-fd.lock"), OPEN_FLAGS, 0o600)
    stack.callback(os.close, fd)

    def operation() -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)

    return operation


def raw_open_flock_close(stack: contextlib.ExitStack) -> Operation:
    path = environment.work_file("raw-open.lock")

    def operation() -> None:
        fd = os.open(path, OPEN_FLAGS, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)

    return operation


def peer_filelock(stack: contextlib.ExitStack) -> Operation:
    from filelock import FileLock

    lock = FileLock(environment.work_file("filelock.lock"))

    def operation() -> None:
        lock.acquire(timeout=0)
        lock.release()

    return operation


def peer_portalocker(stack: contextlib.ExitStack) -> Operation:
    import portalocker

    lock = portalocker.Lock(environment.work_file("portalocker.lock"), fail_when_locked=True)

    def operation() -> None:
        lock.acquire()
        lock.release()

    return operation


def app(slug: str, strategy: str, **isolatable: str) -> Callable[[contextlib.ExitStack], Operation]:
    def make(stack: contextlib.ExitStack) -> Operation:
        isolation = environment.isolation(f"uncontended-{slug}", strategy, **isolatable)
        return lambda: isolation.try_lock().release()

    return make


def thread_lock(stack: contextlib.ExitStack) -> Operation:
    lock = threading.Lock()

    def operation() -> None:
        lock.acquire()
        lock.release()

    return operation


def raw_redis(stack: contextlib.ExitStack) -> Operation:
    client = environment.redis_client()
    stack.callback(client.close)
    key, token = environment.KEY_PREFIX + "raw", secrets.token_hex(16)

    def operation() -> None:
        _must(client.set(key, token, nx=True, px=60_000))
        client.delete(key)

    return operation


def peer_redis_py(stack: contextlib.ExitStack) -> Operation:
    client = environment.redis_client()
    stack.callback(client.close)
    lock = client.lock(environment.KEY_PREFIX + "redis-py", timeout=60)

    def operation() -> None:
        _must(lock.acquire(blocking=False))
        lock.release()

    return operation


def peer_python_redis_lock(stack: contextlib.ExitStack) -> Operation:
    import redis_lock

    client = environment.redis_client()
    stack.callback(client.close)
    lock = redis_lock.Lock(client, environment.KEY_PREFIX + "python-redis-lock", expire=60)

    def operation() -> None:
        _must(lock.acquire(blocking=False))
        lock.release()

    return operation


def raw_advisory(stack: contextlib.ExitStack) -> Operation:
    import psycopg

    connection = psycopg.connect(**environment.postgres_params(), autocommit=True)
    stack.callback(connection.close)
    key = environment.advisory_key("raw")

    def operation() -> None:
        row = connection.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        _must(row and row[0])
        connection.execute("SELECT pg_advisory_unlock(%s)", (key,))

    return operation


def _lock_row(alias: str, slug: str) -> dict[str, object]:
    """A lock table row, as a naive lock written with the ORM would make it."""
    name = environment.lock_name(slug)
    now = timezone.now()
    return {
        "name_hash": environment.name_hash(name),
        "name": name,
        "token": secrets.token_hex(16),
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "host_id": "benchmarks",
        "process_started_at": now,
        "acquired_at": now,
        "argv": json.dumps(["benchmarks/run.py"]),
        "expires_at": now + timedelta(seconds=60),
    }


def raw_rows(alias: str) -> Callable[[contextlib.ExitStack], Operation]:
    """INSERT + DELETE of one lock row through the driver's own cursor (no ORM, no Python)."""

    def make(stack: contextlib.ExitStack) -> Operation:
        environment.ensure_lock_table(alias)
        wrapper = connections[alias]
        wrapper.ensure_connection()
        mark = "?" if wrapper.vendor == "sqlite" else "%s"
        row = _lock_row(alias, f"raw-{alias}")
        values = [
            wrapper.ops.adapt_datetimefield_value(v) if isinstance(v, datetime) else v
            for v in row.values()
        ]
        table = environment.LOCK_TABLE
        insert = f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join([mark] * len(row))})"
        delete = f"DELETE FROM {table} WHERE name_hash = {mark}"
        cursor = wrapper.connection.cursor()
        stack.callback(cursor.close)

        def operation() -> None:
            cursor.execute(insert, values)
            cursor.execute(delete, (values[0],))

        return operation

    return make


def orm_rows(alias: str) -> Callable[[contextlib.ExitStack], Operation]:
    """A naive ORM lock: ``create()`` a row with a fresh token and expiry, then ``delete()`` it."""

    def make(stack: contextlib.ExitStack) -> Operation:
        from django_isolatable.models import Lock

        environment.ensure_lock_table(alias)
        objects = Lock.objects.using(alias)
        row = _lock_row(alias, f"orm-{alias}")

        def operation() -> None:
            now = timezone.now()
            expires_at = now + timedelta(seconds=60)
            fields = {**row, "token": secrets.token_hex(16), "acquired_at": now}
            objects.create(**{**fields, "expires_at": expires_at}).delete()

        return operation

    return make


def _rows_on(alias: str, title: str) -> tuple[str, str, list[Subject]]:
    return (
        f"rows:{alias}",
        f"Lock rows in {title} (raw: INSERT + DELETE on the driver's cursor)",
        [
            Subject("raw INSERT + DELETE", raw_rows(alias), (alias,)),
            Subject("naive ORM create() + delete()", orm_rows(alias), (alias,)),
            Subject(
                "database strategy",
                app(f"database-{alias}", "database", DATABASE_ALIAS=alias),
                (alias,),
            ),
        ],
    )


#: (key, title, subjects): the first subject is the raw limit; results are keyed "key/label".
GROUPS: list[tuple[str, str, list[Subject]]] = [
    (
        "file",
        "File locks (raw: open + flock + close)",
        [
            Subject("raw open + flock + close", raw_open_flock_close),
            Subject("raw flock on an open fd", raw_flock),
            Subject("filelock", peer_filelock, ("filelock",)),
            Subject("portalocker", peer_portalocker, ("portalocker",)),
            Subject("file strategy", app("file", "file")),
        ],
    ),
    (
        "memory",
        "In one process (raw: threading.Lock)",
        [
            Subject("threading.Lock", thread_lock),
            Subject("memory strategy", app("memory", "memory")),
        ],
    ),
    (
        "redis",
        "Redis (raw: SET NX PX + DEL, redis-py, one connection)",
        [
            Subject("raw SET NX PX + DEL", raw_redis, ("redis",)),
            Subject("redis-py Lock", peer_redis_py, ("redis",)),
            Subject("python-redis-lock", peer_python_redis_lock, ("redis", "python-redis-lock")),
            Subject("redis strategy", app("redis", "redis"), ("redis",)),
            Subject("cache strategy (Django RedisCache)", app("cache", "cache"), ("redis",)),
        ],
    ),
    (
        "postgres",
        "PostgreSQL advisory locks (raw: pg_try_advisory_lock + unlock, warm connection)",
        [
            Subject("raw try_advisory_lock + unlock", raw_advisory, ("postgres",)),
            Subject("postgres strategy", app("postgres", "postgres"), ("postgres",)),
        ],
    ),
    _rows_on("postgres", "PostgreSQL"),
    _rows_on("mariadb", "MariaDB"),
    _rows_on("sqlite", "SQLite"),
]


def _batch_size(operation: Operation, seconds: float, clock: Callable[[], float]) -> int:
    """How many operations fill a batch of about ``seconds`` of ``clock`` (after a short
    warm-up: files opened, caches filled)."""
    for _ in range(10):
        operation()
    count, started = 0, clock()
    while clock() - started < seconds:
        operation()
        count += 1
    return max(count, 1)


def measure(
    operations: dict[str, Operation],
    batches: int,
    seconds: float,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Microseconds (of ``clock``: wall time, or ``time.process_time`` for CPU time) per
    operation of each batch, batches of the rows interleaved at random."""
    sizes = {label: _batch_size(op, seconds, clock) for label, op in operations.items()}
    samples: dict[str, list[float]] = {label: [] for label in operations}
    order = list(operations)
    for _ in range(batches):
        random.shuffle(order)
        for label in order:
            operation, size = operations[label], sizes[label]
            started = clock()
            for _ in range(size):
                operation()
            samples[label].append((clock() - started) / size * 1e6)
    return samples


def run(batches: int, seconds: float) -> dict[str, float]:
    """Measure and print every group; return each row's median (µs) by "group key/label"."""
    medians: dict[str, float] = {}
    groups = []
    with placement.servers_apart() as placed:
        for key, title, subjects in GROUPS:
            groups.append(_run_group(key, title, subjects, batches, seconds, medians))
    print_table(
        f"Uncontended acquire + release, µs per operation "
        f"({batches} batches of ~{seconds * 1000:g} ms; {placed})",
        ["median", "p90"],
        groups,
    )
    return medians


def _run_group(
    key: str,
    title: str,
    subjects: list[Subject],
    batches: int,
    seconds: float,
    medians: dict[str, float],
) -> Group:
    """Measure one group's rows (adding their medians to ``medians``) and return its table."""
    group = Group(title)
    with contextlib.ExitStack() as stack:
        operations = {}
        for subject in subjects:
            reasons = [r for r in map(environment.unavailable, subject.needs) if r]
            if reasons:
                group.skipped.append(f"{subject.label}: {reasons[0]}")
            else:
                operations[subject.label] = subject.make(stack)
        samples = measure(operations, batches, seconds)
    for label, values in samples.items():
        medians[f"{key}/{label}"] = median(values)
        base_median = medians.get(f"{key}/{subjects[0].label}")
        cells = [f"{median(values):.1f}", f"{percentile(values, 0.9):.1f}"]
        group.rows.append(Row(label, cells, ratio(median(values), base_median)))
    return group
