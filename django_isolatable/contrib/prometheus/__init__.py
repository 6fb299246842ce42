"""Lock metrics for Prometheus: add ``"django_isolatable.contrib.prometheus"`` to
``INSTALLED_APPS`` (with the ``[prometheus]`` extra installed) and the counters, the wait
histogram and the held-age gauge appear on prometheus_client's default registry, or on the one
``settings.ISOLATABLE_PROMETHEUS["REGISTRY"]`` names. See docs/prometheus.md.
"""
