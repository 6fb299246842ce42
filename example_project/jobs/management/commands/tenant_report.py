"""One report per tenant at a time; different tenants run side by side.

`manage.py tenant_report acme` and `manage.py tenant_report globex` never block each other,
two `manage.py tenant_report acme` do: the lock name is `tenant_report:acme`.
"""

import time

from django_isolatable import IsolatableCommand


class Command(IsolatableCommand):
    help = "Build the monthly report of one tenant."

    def add_arguments(self, parser):
        parser.add_argument("tenant")
        parser.add_argument("--seconds", type=float, default=2.0)

    def get_isolation_id(self, *args, **options):
        return options["tenant"]

    def handle(self, *args, **options):
        time.sleep(options["seconds"])
        self.stdout.write(f"Report for {options['tenant']} built.")
