"""An isolated command that does nothing: `benchmarks/run.py` times it against noop_plain.

With ISOLATABLE_REPORT_DRIVERS=1 in the environment it prints which optional drivers the run
imported; with the file strategy that should be none.
"""

import os
import sys

from django_isolatable import IsolatableCommand

OPTIONAL_DRIVERS = ("redis", "psycopg", "psycopg2", "MySQLdb", "pymysql")


class Command(IsolatableCommand):
    help = "Do nothing, under the lock noop_isolated (the benchmarks time it)."

    def handle(self, *args, **options):
        if os.environ.get("ISOLATABLE_REPORT_DRIVERS") == "1":
            imported = [name for name in OPTIONAL_DRIVERS if name in sys.modules]
            self.stdout.write(f"drivers imported: {', '.join(imported) or 'none'}")
