"""``metrics``: the registry's metrics in Prometheus's text format, for projects that expose no
metrics endpoint of their own (``path("metrics", metrics)``). Protect it as any internal page."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from django_isolatable.contrib.prometheus import conf
from django_isolatable.contrib.prometheus.metrics import install


def metrics(request: HttpRequest) -> HttpResponse:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = conf.registry()
    install(registry)
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
