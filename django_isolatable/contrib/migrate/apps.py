from __future__ import annotations

from django.apps import AppConfig


class IsolatableMigrateConfig(AppConfig):
    name = "django_isolatable.contrib.migrate"
    label = "isolatable_migrate"  # "migrate" alone would be an easy label to collide with
    verbose_name = "Isolated migrate"
