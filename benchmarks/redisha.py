"""The redis strategy through Sentinel and on a Cluster (``--only redis-ha``).

Starts the tests' own topologies on 127.0.0.1 (tests/redis_topologies.py: a master, a
replica and three sentinels; a 3-master cluster), then:

- uncontended ``try_lock()`` + ``release()`` on the Sentinel group's master named by
  ``REDIS_URL`` (the plain figure, the same server), through the sentinels, through them with
  ``REDIS_REPLICA_ACKS=1``, and on the cluster; batches of the rows interleaved in random order;
- one failover: a holder whose lease the replica lacks (deleted there, as an unreplicated
  write would be) and a contender waiting for it; the master SIGKILLed: seconds from the kill
  to the promotion, to the first new holder, and to the lost lease being reported.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from typing import Any

from benchmarks import environment
from benchmarks.report import Group, Row, median, print_table, ratio

FAILOVER_TTL = 9.0


def _lock_release(label: str, settings: dict[str, Any]) -> tuple[str, Any]:
    isolation = environment.isolation("redis-ha-" + label.split()[0], "redis", **settings)
    return label, lambda: isolation.try_lock().release()


def _time_rows(subjects: list[tuple[str, Any]], batches: int, batch_seconds: float) -> Group:
    samples: dict[str, list[float]] = {label: [] for label, _ in subjects}
    for _ in range(batches):
        for label, operation in random.sample(subjects, len(subjects)):
            count, began = 0, time.perf_counter()
            while (took := time.perf_counter() - began) < batch_seconds:
                operation()
                count += 1
            samples[label].append(took / count * 1e6)
    group = Group("lock + release, one process (plain: the Sentinel group's master by URL)")
    base = median(samples[subjects[0][0]])
    for label, _ in subjects:
        figure = median(samples[label])
        group.rows.append(Row(label, [f"{figure:.0f} us"], ratio(figure, base)))
    return group


def _failover(group: Any) -> Group:
    """One failover's figures, in seconds from the kill."""
    from django.conf import settings
    from django.test import override_settings

    with override_settings(ISOLATABLE={**settings.ISOLATABLE, **group.settings}):
        return _fail_over(group)


def _fail_over(group: Any) -> Group:
    from django_isolatable import CommandIsolation
    from django_isolatable.errors import IsolationError
    from django_isolatable.signals import lock_lost

    name = environment.lock_name("redis-ha-failover")
    holder = CommandIsolation(name, strategy="redis", ttl=FAILOVER_TTL)
    contender = CommandIsolation(name, strategy="redis", ttl=FAILOVER_TTL)
    guard = holder.try_lock()
    assert guard is not None
    lost, taken, stop = threading.Event(), threading.Event(), threading.Event()
    lock_lost.connect(lambda sender, **kwargs: lost.set(), weak=False, dispatch_uid="redis-ha")

    def contend() -> None:
        while not stop.is_set():
            try:
                new = contender.lock(timeout=0.5)
            except IsolationError:  # held, or no master yet
                time.sleep(0.05)
                continue
            taken.set()
            new.release()
            return

    key = holder.backend._keys(name).lock  # type: ignore[attr-defined]
    replica = group.replicas()[0]
    with replica.client() as client:
        client.config_set("replica-read-only", "no")
        client.delete(key)
        client.config_set("replica-read-only", "yes")
    thread = threading.Thread(target=contend, daemon=True)
    thread.start()
    killed_server = group.kill_master()
    killed = time.monotonic()
    group.wait_for_failover(killed_server.address)
    promoted = time.monotonic() - killed
    taken.wait(30)
    new_holder = time.monotonic() - killed
    lost.wait(30)
    reported = time.monotonic() - killed
    stop.set()
    thread.join(5)
    guard.release()
    group.restart_as_replica(killed_server)
    figures = Group(f"a failover (TTL {FAILOVER_TTL:g} s), seconds after the master's SIGKILL")
    for label, value in (
        ("the replica promoted", promoted),
        ("the first new holder", new_holder),
        ("the lost lease reported", reported),
    ):
        figures.rows.append(Row(label, [f"{value:.2f} s"]))
    return figures


def run(batches: int, batch_seconds: float) -> list[Group]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        print("\nredis-ha: skipped (redis-server or redis-cli is not installed)")
        return []
    from tests.redis_topologies import Cluster, SentinelGroup, running

    with running(SentinelGroup) as group, running(Cluster) as cluster:
        master = group.master()
        subjects = [
            _lock_release("plain Redis", {"REDIS_URL": f"redis://127.0.0.1:{master.port}/0"}),
            _lock_release("Sentinel", group.settings),
            _lock_release("Sentinel+acks (REDIS_REPLICA_ACKS=1)", {**group.settings,
                                                                  "REDIS_REPLICA_ACKS": 1}),
            _lock_release("Cluster", cluster.settings),
        ]  # fmt: skip
        groups = [_time_rows(subjects, batches, batch_seconds), _failover(group)]
    print_table("Redis high availability", ["figure"], groups[:1])
    print_table("Redis failover", ["seconds"], groups[1:], ratios=False)
    return groups
