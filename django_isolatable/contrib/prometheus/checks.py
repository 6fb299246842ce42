"""The app's system check, registered by its ``ready()``: prometheus_client installed
(``isolatable.E060``), and ``ISOLATABLE_PROMETHEUS`` valid (``isolatable.E061``)."""

from __future__ import annotations

from typing import Any

from django.core.checks import CheckMessage, Error

from django_isolatable.contrib.prometheus.conf import client_missing, missing_client_message


def check_prometheus(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if client_missing():
        return [Error(missing_client_message(), id="isolatable.E060")]
    from django_isolatable.contrib.prometheus.conf import problems

    return [Error(message, id="isolatable.E061") for message in problems()]
