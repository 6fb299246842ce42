from __future__ import annotations

from django.apps import AppConfig


class IsolatablePrometheusConfig(AppConfig):
    name = "django_isolatable.contrib.prometheus"
    label = "isolatable_prometheus"  # "prometheus" alone is django-prometheus's module name
    verbose_name = "Isolatable lock metrics"

    def ready(self) -> None:
        from django.core.checks import register

        from django_isolatable.contrib.prometheus.checks import check_prometheus
        from django_isolatable.contrib.prometheus.conf import client_missing

        register(check_prometheus)

        # Without prometheus_client the system check reports it (manage.py check, runserver and
        # migrate stop on it); importing metrics or views raises ImproperlyConfigured.
        if not client_missing():
            from django_isolatable.contrib.prometheus.metrics import install

            install()
