"""``isolatable_lock_held_seconds`` and ``isolatable_lock_store_up``: the held locks' ages, read
from each strategy's store with ``list()`` at most once per ``AGE_CACHE_SECONDS`` however often
scraped. A store that fails is logged and reported as ``store_up 0``; the scrape goes on."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from django_isolatable.backends import Backend, backend_for
from django_isolatable.conf import isolatable_settings
from django_isolatable.contrib.prometheus import conf

logger = logging.getLogger("django_isolatable.contrib.prometheus")

#: (name label, strategy, mode) -> the oldest holder's acquired_at
Oldest = dict[tuple[str, str, str], datetime]


class HeldLocksCollector(Collector):
    """Collects the age gauge; the stores' reads are shared by every scrape within the cache
    interval (``refreshes`` counts them) and by every thread scraping at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._oldest: Oldest = {}
        self._up: dict[str, bool] = {}
        self._backends: dict[str, Backend] = {}
        self._generation = -1
        self.refreshes = 0

    def describe(self) -> Iterator[Any]:
        # The default registry calls collect() at registration unless describe() exists: that
        # would read the stores while Django starts.
        yield from self._families({}, {}, datetime.now(timezone.utc))

    def collect(self) -> Iterator[Any]:
        with self._lock:
            now = time.monotonic()
            if self._read_at is None or now - self._read_at >= conf.age_cache_seconds():
                self._oldest, self._up = self._read()
                self._read_at = time.monotonic()
                self.refreshes += 1
            oldest, up = dict(self._oldest), dict(self._up)
        yield from self._families(oldest, up, datetime.now(timezone.utc))

    def _families(
        self, oldest: Oldest, up: dict[str, bool], now: datetime
    ) -> Iterator[GaugeMetricFamily]:
        held = GaugeMetricFamily(
            "isolatable_lock_held_seconds",
            "Age of the oldest holder of each held lock, from the store.",
            labels=["name", "strategy", "mode"],
        )
        for labels, acquired_at in sorted(oldest.items()):
            held.add_metric(list(labels), max(0.0, (now - acquired_at).total_seconds()))
        yield held
        store_up = GaugeMetricFamily(
            "isolatable_lock_store_up",
            "1 if the last read of the strategy's held locks succeeded, else 0.",
            labels=["strategy"],
        )
        for strategy, ok in sorted(up.items()):
            store_up.add_metric([strategy], 1.0 if ok else 0.0)
        yield store_up

    def _backend(self, strategy: str) -> Backend:
        if self._generation != isolatable_settings.generation:
            self._backends, self._generation = {}, isolatable_settings.generation
        if strategy not in self._backends:
            self._backends[strategy] = backend_for(strategy)
        return self._backends[strategy]

    def _read(self) -> tuple[Oldest, dict[str, bool]]:
        oldest: Oldest = {}
        up: dict[str, bool] = {}
        label = conf.name_label()
        for strategy in conf.strategies():
            found: Oldest = {}
            try:
                for info in self._backend(strategy).list():
                    if info.acquired_at is None:
                        continue
                    key = (label(info.name), strategy, info.mode)
                    if key not in found or info.acquired_at < found[key]:
                        found[key] = info.acquired_at
            except Exception:
                # Any failure of the store or its driver: the scrape must still answer.
                logger.exception("Cannot read the held locks of the %s strategy", strategy)
                up[strategy] = False
                continue
            up[strategy] = True
            oldest.update(found)
        return oldest, up
