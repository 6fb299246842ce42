"""Django's own `migrate`, isolated: concurrent deploy hooks never migrate at the same time.

Run it from deploy hooks with `--wait`, so each replica returns only once the schema is ready.
The database NAME is the isolation id, so migrating two databases does not serialise them.
"""

from django.core.management.commands import migrate
from django.db import connections

from django_isolatable import IsolatableCommand


class Command(IsolatableCommand, migrate.Command):
    def get_isolation_id(self, *args, **options):
        return str(connections[options["database"]].settings_dict["NAME"])
