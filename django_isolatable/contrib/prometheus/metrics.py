"""The lock counters and the wait histogram, fed by django-isolatable's signals, and
``install()``, which puts them and the held-age gauge on a registry.

Raises ``ImproperlyConfigured`` on import when prometheus_client is not installed.
"""

from __future__ import annotations

import threading
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from django_isolatable.contrib.prometheus.conf import missing_client_message

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram
except ImportError as e:  # pragma: no cover - the tests run with it installed
    raise ImproperlyConfigured(missing_client_message()) from e

from django_isolatable.contrib.prometheus import conf
from django_isolatable.contrib.prometheus.collector import HeldLocksCollector
from django_isolatable.signals import lock_acquired, lock_lost, lock_skipped, lock_taken_over

#: Lock waits: most locks are taken at once (milliseconds), a waiting command may wait for a
#: whole run of the holder (minutes to an hour).
WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, float("inf"))
LABELS = ("name", "strategy")

_installed: dict[int, LockMetrics] = {}
_installing = threading.Lock()


class LockMetrics:
    """The metrics of one registry; ``connect()`` feeds them from the signals."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.acquired = Counter(
            "isolatable_locks_acquired", "Locks taken.", LABELS, registry=registry
        )
        self.skipped = Counter(
            "isolatable_locks_skipped",
            "Lock calls that gave up without the lock (AlreadyRunning or LockTimeout).",
            LABELS,
            registry=registry,
        )
        self.lost = Counter(
            "isolatable_locks_lost",
            "Held locks whose lease was found expired or taken.",
            LABELS,
            registry=registry,
        )
        self.taken_over = Counter(
            "isolatable_locks_taken_over",
            "Locks of dead holders taken over.",
            LABELS,
            registry=registry,
        )
        self.wait = Histogram(
            "isolatable_lock_wait_seconds",
            "Seconds a lock call took to get the lock, waiting included.",
            LABELS,
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.held = HeldLocksCollector()
        registry.register(self.held)
        self._uid = f"isolatable-prometheus-{id(self)}"

    def labels(self, sender: Any, name: str) -> tuple[str, str]:
        return conf.name_label()(name), str(sender.strategy)

    def on_acquired(self, sender: Any, name: str, waited: float, **kwargs: Any) -> None:
        labels = self.labels(sender, name)
        self.acquired.labels(*labels).inc()
        self.wait.labels(*labels).observe(waited)

    def on_skipped(self, sender: Any, name: str, **kwargs: Any) -> None:
        self.skipped.labels(*self.labels(sender, name)).inc()

    def on_lost(self, sender: Any, name: str, **kwargs: Any) -> None:
        self.lost.labels(*self.labels(sender, name)).inc()

    def on_taken_over(self, sender: Any, name: str, **kwargs: Any) -> None:
        self.taken_over.labels(*self.labels(sender, name)).inc()

    def _pairs(self) -> list[tuple[Any, Any]]:
        return [
            (lock_acquired, self.on_acquired),
            (lock_skipped, self.on_skipped),
            (lock_lost, self.on_lost),
            (lock_taken_over, self.on_taken_over),
        ]

    def connect(self) -> None:
        for signal, receiver in self._pairs():
            signal.connect(receiver, weak=False, dispatch_uid=self._uid)

    def disconnect(self) -> None:
        for signal, _receiver in self._pairs():
            signal.disconnect(dispatch_uid=self._uid)


def install(registry: CollectorRegistry | None = None) -> LockMetrics:
    """The metrics on ``registry`` (default: the ``REGISTRY`` setting, else prometheus_client's
    default registry), created and connected to the signals on the first call for that registry;
    later calls return the same object."""
    chosen = registry if registry is not None else conf.registry()
    with _installing:
        metrics = _installed.get(id(chosen))
        if metrics is None or metrics.registry is not chosen:
            metrics = _installed[id(chosen)] = LockMetrics(chosen)
            metrics.connect()
        return metrics


def uninstall(registry: CollectorRegistry) -> None:
    """Disconnects and unregisters the metrics ``install(registry)`` made (tests)."""
    with _installing:
        metrics = _installed.pop(id(registry), None)
    if metrics is not None:
        metrics.disconnect()
        for collector in (
            metrics.acquired,
            metrics.skipped,
            metrics.lost,
            metrics.taken_over,
            metrics.wait,
            metrics.held,
        ):
            registry.unregister(collector)
