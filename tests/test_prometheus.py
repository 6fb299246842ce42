"""django_isolatable.contrib.prometheus, read as Prometheus reads it: each test's own registry
exposed with ``generate_latest`` and parsed back with prometheus_client's parser, after real
lock calls. The holders that make a call skip or be taken over are real other processes
(``tests/workers.py``): a live one on the file strategy, one killed with SIGKILL on the database
strategy over a SQLite file (its same-host dead pid is taken over at once).
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.apps import apps
from django.core.checks.registry import registry as check_registry
from django.core.exceptions import ImproperlyConfigured
from django.test import RequestFactory, override_settings
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from django_isolatable import AlreadyRunning, CommandIsolation
from django_isolatable.backends.file import FileBackend
from django_isolatable.contrib.prometheus import checks, conf
from django_isolatable.contrib.prometheus.metrics import LockMetrics, install, uninstall
from django_isolatable.contrib.prometheus.views import metrics as metrics_view
from tests.processes import Worker
from tests.settings import KEY_PREFIX

SQLITE_DATABASE = {"STRATEGY": "database", "DATABASE_ALIAS": "sqlite", "KEY_PREFIX": KEY_PREFIX}
#: The registry the app itself installs on in test_adding_the_app_is_all_it_takes.
APP_REGISTRY = CollectorRegistry()


class Scrape:
    """One exposition of a registry, parsed: ``value(sample, **labels)``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        text = generate_latest(registry).decode()
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def value(self, sample: str, **labels: str) -> float | None:
        found = [s.value for s in self.samples if s.name == sample and s.labels == labels]
        assert len(found) <= 1, (sample, labels)
        return found[0] if found else None

    def labelled(self, sample: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == sample]


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    """A registry of this test's own, with the metrics installed on it."""
    registry = CollectorRegistry(auto_describe=True)
    install(registry)
    yield registry
    uninstall(registry)


@pytest.fixture
def metrics(registry: CollectorRegistry) -> LockMetrics:
    return install(registry)


@pytest.fixture
def spawn(tmp_path: Path, lock_dir: Path) -> Iterator[Callable[..., Worker]]:
    """``spawn(name, settings)``: a ``hold`` worker on ``name``, killed at the end."""
    started: list[Worker] = []

    def start(name: str, isolatable: dict[str, Any] | None = None) -> Worker:
        env = {"ISOLATABLE_TEST_SETTINGS": json.dumps(isolatable or {})}
        worker = Worker(
            tmp_path / f"holder-{len(started)}.stderr", "hold", name, str(lock_dir), env=env
        )
        started.append(worker)
        worker.expect("held")
        return worker

    yield start
    for worker in started:
        worker.close()


@pytest.fixture
def sqlite_database(settings, django_db_blocker) -> Iterator[None]:
    settings.ISOLATABLE = {**settings.ISOLATABLE, **SQLITE_DATABASE}
    with django_db_blocker.unblock():
        yield


@pytest.fixture
def list_calls(monkeypatch) -> list[str]:
    """Every ``FileBackend.list()`` call, counted."""
    calls: list[str] = []
    real = FileBackend.list

    def counted(self: FileBackend) -> Any:
        calls.append("list")
        return real(self)

    monkeypatch.setattr(FileBackend, "list", counted)
    return calls


def test_acquisitions_are_counted_with_their_waits(registry):
    for feed in ("a", "b", "a"):
        CommandIsolation(f"import:{feed}").try_lock().release()
    CommandIsolation("report").try_lock().release()

    scrape = Scrape(registry)
    assert scrape.value("isolatable_locks_acquired_total", name="import", strategy="file") == 3
    assert scrape.value("isolatable_locks_acquired_total", name="report", strategy="file") == 1
    assert scrape.value("isolatable_lock_wait_seconds_count", name="import", strategy="file") == 3
    wait = scrape.value("isolatable_lock_wait_seconds_sum", name="import", strategy="file")
    assert wait is not None
    assert 0 <= wait < 5
    assert (
        scrape.value(
            "isolatable_lock_wait_seconds_bucket", name="import", strategy="file", le="+Inf"
        )
        == 3
    )
    assert scrape.labelled("isolatable_locks_skipped_total") == []


def test_skips_and_the_held_age_of_a_holder_in_another_process(registry, spawn, settings):
    settings.ISOLATABLE_PROMETHEUS = {"AGE_CACHE_SECONDS": 0}
    holder = spawn("sync:42")
    time.sleep(0.3)
    for _ in range(2):
        with pytest.raises(AlreadyRunning):
            CommandIsolation("sync:42").try_lock()

    scrape = Scrape(registry)
    assert scrape.value("isolatable_locks_skipped_total", name="sync", strategy="file") == 2
    assert scrape.value("isolatable_locks_acquired_total", name="sync", strategy="file") is None
    age = scrape.value(
        "isolatable_lock_held_seconds", name="sync", strategy="file", mode="exclusive"
    )
    assert age is not None
    assert 0.2 < age < 60
    assert scrape.value("isolatable_lock_store_up", strategy="file") == 1

    holder.finish()
    scrape = Scrape(registry)
    assert scrape.labelled("isolatable_lock_held_seconds") == []
    assert scrape.value("isolatable_lock_store_up", strategy="file") == 1


def test_a_lease_taken_away_is_counted_lost(registry, sqlite_database):
    guard = CommandIsolation("lost:1").try_lock()
    CommandIsolation("lost:1").release_all()  # as `locks release --force` would
    guard.release()

    scrape = Scrape(registry)
    assert scrape.value("isolatable_locks_lost_total", name="lost", strategy="database") == 1
    assert scrape.value("isolatable_locks_acquired_total", name="lost", strategy="database") == 1


def test_a_sigkilled_holders_lock_taken_over_is_counted(registry, spawn, sqlite_database):
    name = f"takeover:{time.monotonic_ns()}"
    spawn(name, SQLITE_DATABASE).kill()
    try:
        CommandIsolation(name).try_lock().release()
    finally:
        CommandIsolation(name).release_all()

    scrape = Scrape(registry)
    labels = {"name": "takeover", "strategy": "database"}
    assert scrape.value("isolatable_locks_taken_over_total", **labels) == 1
    assert scrape.value("isolatable_locks_acquired_total", **labels) == 1


def test_the_held_age_is_read_from_the_store_once_per_interval(registry, list_calls, settings):
    guard = CommandIsolation("nightly").try_lock()
    try:
        first = Scrape(registry)  # the default interval: 5 s
        second = Scrape(registry)
        assert len(list_calls) == 1
        labels = {"name": "nightly", "strategy": "file", "mode": "exclusive"}
        age, later = (
            first.value("isolatable_lock_held_seconds", **labels),
            second.value("isolatable_lock_held_seconds", **labels),
        )
        assert age is not None
        assert later is not None
        assert later >= age  # the age goes on growing between reads of the store

        settings.ISOLATABLE_PROMETHEUS = {"AGE_CACHE_SECONDS": 0}
        Scrape(registry)
        assert len(list_calls) == 2
    finally:
        guard.release()


def test_holders_of_one_label_show_the_oldest_of_each_mode(registry, settings):
    settings.ISOLATABLE = {**settings.ISOLATABLE, "STRATEGY": "memory"}
    oldest = CommandIsolation("job:1").try_lock()
    time.sleep(0.2)
    younger = CommandIsolation("job:2").try_lock()
    slot = CommandIsolation("job:3", max_holders=2).try_lock()
    try:
        scrape = Scrape(registry)
        exclusive = scrape.value(
            "isolatable_lock_held_seconds", name="job", strategy="memory", mode="exclusive"
        )
        assert exclusive is not None
        assert exclusive >= 0.2
        assert (
            scrape.value(
                "isolatable_lock_held_seconds", name="job", strategy="memory", mode="semaphore"
            )
            is not None
        )
        assert len(scrape.labelled("isolatable_lock_held_seconds")) == 2
    finally:
        for guard in (oldest, younger, slot):
            guard.release()


def test_the_name_label_setting(registry, settings):
    settings.ISOLATABLE_PROMETHEUS = {
        "NAME_LABEL": "django_isolatable.contrib.prometheus.conf.full_name"
    }
    CommandIsolation("import:7").try_lock().release()
    scrape = Scrape(registry)
    assert scrape.value("isolatable_locks_acquired_total", name="import:7", strategy="file") == 1


def test_a_failing_store_is_logged_and_the_scrape_goes_on(registry, settings, monkeypatch, caplog):
    settings.ISOLATABLE = {**settings.ISOLATABLE, "REDIS_URL": "redis://127.0.0.1:1/0"}
    settings.ISOLATABLE_PROMETHEUS = {"STRATEGIES": ["file", "redis"]}
    CommandIsolation("still-counted").try_lock().release()
    with caplog.at_level(logging.ERROR, "django_isolatable.contrib.prometheus"):
        scrape = Scrape(registry)
    assert scrape.value("isolatable_lock_store_up", strategy="redis") == 0
    assert scrape.value("isolatable_lock_store_up", strategy="file") == 1
    assert (
        scrape.value("isolatable_locks_acquired_total", name="still-counted", strategy="file") == 1
    )
    assert any("redis" in r.getMessage() and r.exc_info for r in caplog.records)

    def broken(self: FileBackend) -> Any:
        raise OSError("disk gone")

    monkeypatch.setattr(FileBackend, "list", broken)
    settings.ISOLATABLE_PROMETHEUS = {"STRATEGIES": ["file"], "AGE_CACHE_SECONDS": 0}
    assert Scrape(registry).value("isolatable_lock_store_up", strategy="file") == 0


def test_the_metrics_view(settings, registry):
    settings.ISOLATABLE_PROMETHEUS = {"REGISTRY": registry}
    CommandIsolation("viewed").try_lock().release()
    response = metrics_view(RequestFactory().get("/metrics"))
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert 'isolatable_locks_acquired_total{name="viewed",strategy="file"} 1.0' in (
        response.content.decode()
    )


def test_adding_the_app_is_all_it_takes(settings):
    # Set first: override_settings installs the apps (and runs ready()) before its settings.
    settings.ISOLATABLE_PROMETHEUS = {"REGISTRY": "tests.test_prometheus.APP_REGISTRY"}
    with override_settings(
        INSTALLED_APPS=[*settings.INSTALLED_APPS, "django_isolatable.contrib.prometheus"]
    ):
        try:
            CommandIsolation("by-the-app").try_lock().release()
            scrape = Scrape(APP_REGISTRY)
            labels = {"name": "by-the-app", "strategy": "file"}
            assert scrape.value("isolatable_locks_acquired_total", **labels) == 1
            assert apps.is_installed("django_isolatable.contrib.prometheus")
            assert checks.check_prometheus in check_registry.get_checks()
            assert checks.check_prometheus() == []
        finally:
            uninstall(APP_REGISTRY)
            check_registry.registered_checks.discard(checks.check_prometheus)


def test_without_prometheus_client(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    assert [e.id for e in checks.check_prometheus()] == ["isolatable.E060"]
    assert "pip install 'django-isolatable[prometheus]'" in checks.check_prometheus()[0].msg
    monkeypatch.delitem(sys.modules, "django_isolatable.contrib.prometheus.metrics")
    with pytest.raises(
        ImproperlyConfigured, match=r"pip install 'django-isolatable\[prometheus\]'"
    ):
        importlib.import_module("django_isolatable.contrib.prometheus.metrics")


def test_bad_settings_are_check_errors(settings):
    settings.ISOLATABLE_PROMETHEUS = {"NAME_LABELS": None}
    [error] = checks.check_prometheus()
    assert error.id == "isolatable.E061"
    assert "'NAME_LABELS'" in error.msg
    settings.ISOLATABLE_PROMETHEUS = {"AGE_CACHE_SECONDS": "5", "STRATEGIES": "file"}
    messages = [e.msg for e in checks.check_prometheus()]
    assert any("AGE_CACHE_SECONDS" in m for m in messages)
    assert any("STRATEGIES" in m for m in messages)
    with pytest.raises(ImproperlyConfigured, match="AGE_CACHE_SECONDS"):
        conf.age_cache_seconds()
    settings.ISOLATABLE_PROMETHEUS = 5
    assert [e.msg for e in checks.check_prometheus()] == [
        "settings.ISOLATABLE_PROMETHEUS must be a dict."
    ]
