"""The test module that tests/test_contrib_migrate.py runs with ``manage.py test``."""

from django.test import TestCase

from tests.migrategate.models import Ticket


class MigratedTestDatabase(TestCase):
    def test_the_test_database_is_migrated(self):
        Ticket.objects.create()
        assert Ticket.objects.count() == 1
