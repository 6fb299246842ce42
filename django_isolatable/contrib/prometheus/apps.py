from __future__ import annotations

from django.apps import AppConfig


class IsolatablePrometheusConfig(AppConfig):
    name = "django_isolatable.contrib.prometheus"
    label = "isolatable_prometheus"  # "prometheus" alone is django-prometheus's module name
    verbose_name = "Isolatable lock metrics"

    def ready(self) -> None:
        from django_isolatable.contrib.prometheus import checks  # noqa: F401 - registers them
        from django_isolatable.contrib.prometheus.conf import client_missing

        # Without prometheus_client the system check reports it (manage.py check, runserver and
        # migrate stop on it); importing metrics or views raises ImproperlyConfigured.
        if not client_missing():
            from django_isolatable.contrib.prometheus.metrics import install

            install()
