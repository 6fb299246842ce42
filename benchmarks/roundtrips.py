"""Round trips per operation of the redis and postgres strategies, counted on the wire.

Every lock here reaches its server through a ``wire.CountingProxy``, which counts round trips
whatever the driver does, and only this section's: the servers are shared. The operations are
the lock API's as a user calls them: ``try_lock()`` of a free lock, ``release()``; a renewal is
one ``Backend.refresh()``, which the renewal thread calls once per renewal. For the woken
waiter, one thread holds the lock and another waits in ``lock()`` through a second proxy; once
the server shows the waiter blocked (Redis ``CLIENT LIST``: flag ``b``; PostgreSQL
``pg_stat_activity``: waiting on a lock), the holder releases, and the figure is the waiter's
round trips from then until its ``lock()`` returns: 0 when the answer that wakes it carries the
lock. A waiter that polls instead never shows blocked; the holder releases after a while then.

The first trials warm up: a new connection's handshake, a script's first load, and psycopg
preparing a statement (after its fifth run on a connection, at the cost of one more round trip,
once) are not what each operation costs. The table shows the most any later trial took.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks import environment
from benchmarks.candidates import WAIT_LIMIT
from benchmarks.report import Group, Row, print_table
from benchmarks.wire import CountingProxy
from django_isolatable import CommandIsolation, LockGuard
from django_isolatable.holders import new_record

OPERATIONS = ("acquire", "release", "renewal", "wake-up")
WARM_UP = 8
#: Seconds a waiter gets to show blocked on the server.
BLOCKED_WITHIN = 0.5

#: Whether any of the server's connections from these local ports is blocked on a lock.
Blocked = Callable[[set[int]], bool]


@dataclass(frozen=True)
class Server:
    key: str
    title: str
    #: The ISOLATABLE settings that reach the server through proxy ``number``.
    settings: Callable[[int], dict[str, Any]]
    #: Opens an observer on the stack (not through a proxy) and returns its look.
    observe: Callable[[contextlib.ExitStack], Blocked]


def _redis_observer(stack: contextlib.ExitStack) -> Blocked:
    client = environment.redis_client()
    stack.callback(client.close)

    def blocked(ports: set[int]) -> bool:
        return any(
            int(c["addr"].rpartition(":")[2]) in ports and "b" in c["flags"]
            for c in client.client_list()
        )

    return blocked


def _postgres_observer(stack: contextlib.ExitStack) -> Blocked:
    import psycopg

    connection = psycopg.connect(**environment.postgres_params(), autocommit=True)
    stack.callback(connection.close)

    def blocked(ports: set[int]) -> bool:
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE client_port = ANY(%s) AND wait_event_type = 'Lock'",
            (list(ports),),
        ).fetchone()
        return bool(row and row[0])

    return blocked


SERVERS = [
    Server(
        "redis",
        "Redis",
        lambda number: {"REDIS_URL": environment.counted_redis_url(number)},
        _redis_observer,
    ),
    Server(
        "postgres",
        "PostgreSQL",
        lambda number: {"DATABASE_ALIAS": environment.counted_alias(number)},
        _postgres_observer,
    ),
]


def _counted(proxy: CountingProxy, operation: Callable[[], object]) -> int:
    before = proxy.trips
    operation()
    return proxy.trips - before


def _trial(
    locks: tuple[CommandIsolation, CommandIsolation],
    proxies: tuple[CountingProxy, CountingProxy],
    blocked: Blocked,
) -> dict[str, int]:
    """The round trips of each operation, once."""
    (holder, waiter), (ours, theirs) = locks, proxies
    counts: dict[str, int] = {}
    guards: list[LockGuard] = []
    counts["acquire"] = _counted(ours, lambda: guards.append(holder.try_lock()))
    counts["release"] = _counted(ours, guards.pop().release)

    backend, ttl = holder.backend, holder.ttl
    lease = backend.acquire(holder.name, new_record(holder.name, backend.strategy, ttl=ttl))
    if lease is None:
        raise RuntimeError(f"lock {holder.name} was not free")
    counts["renewal"] = _counted(ours, lambda: backend.refresh(lease, ttl))
    backend.release(lease)

    guard = holder.try_lock()
    seen: list[int] = []

    def wait() -> None:
        woken = waiter.lock(timeout=WAIT_LIMIT)
        seen.append(theirs.trips)  # before its release() adds its own
        woken.release()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    # A waiter that polls never shows blocked: its round trips after the release count all the
    # same, from when it has surely started waiting.
    deadline = time.monotonic() + BLOCKED_WITHIN
    while not blocked(theirs.server_ports()) and time.monotonic() < deadline:
        if not thread.is_alive():
            guard.release()
            raise RuntimeError(f"the waiter of lock {holder.name} failed")
        time.sleep(0.002)
    before = theirs.trips
    guard.release()
    thread.join(WAIT_LIMIT)
    if not seen:
        raise RuntimeError(f"the waiter did not take lock {holder.name}")
    counts["wake-up"] = seen[0] - before
    return counts


def _proxy(server: Server, number: int) -> CountingProxy:
    proxy = environment.proxy(server.key, number)
    if proxy is None:
        raise RuntimeError(f"no proxy {number} to {server.title}")
    return proxy


def _measure(server: Server, trials: int) -> dict[str, int]:
    """The most round trips each operation took in ``trials`` trials after the warm-up."""
    slug = f"trips-{server.key}"
    holder, waiter = (
        environment.isolation(slug, server.key, **server.settings(number)) for number in (0, 1)
    )
    proxies = (_proxy(server, 0), _proxy(server, 1))
    most = dict.fromkeys(OPERATIONS, 0)
    with contextlib.ExitStack() as stack:
        blocked = server.observe(stack)
        for trial in range(WARM_UP + trials):
            counts = _trial((holder, waiter), proxies, blocked)
            if trial >= WARM_UP:
                most = {operation: max(most[operation], counts[operation]) for operation in most}
    holder.backend.close()
    waiter.backend.close()
    return most


def _unavailable(server: Server) -> str | None:
    reason = environment.unavailable(server.key)
    server.settings(0)  # makes the Redis proxies
    if reason is None and environment.proxy(server.key, 0) is None:
        reason = f"{server.title} is not reached over TCP, so no proxy can count"
    return reason


def run(trials: int) -> dict[str, int]:
    """Measure and print; return the most round trips by "server key/operation"."""
    results: dict[str, int] = {}
    groups = []
    for server in SERVERS:
        group = Group(server.title)
        reason = _unavailable(server)
        if reason:
            group.skipped.append(f"{server.key} strategy: {reason}")
        else:
            most = _measure(server, trials)
            results.update({f"{server.key}/{operation}": most[operation] for operation in most})
            group.rows.append(Row(f"{server.key} strategy", [str(most[o]) for o in OPERATIONS]))
        groups.append(group)
    print_table(
        f"Round trips per operation, counted on the wire by a proxy (the most of {trials} "
        f"trials after {WARM_UP} to warm up; wake-up: a woken waiter's, from the release to "
        "holding the lock)",
        list(OPERATIONS),
        groups,
        ratios=False,
    )
    return results
