"""Django's ``migrate``, isolated per database and waiting by default (docs/migrate.md).

List ``"django_isolatable.contrib.migrate"`` first in ``INSTALLED_APPS``.
"""
