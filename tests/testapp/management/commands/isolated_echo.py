"""A test command: records that handle() ran, optionally for a while, keyed by --key."""

import time
from pathlib import Path

from django_isolatable import IsolatableCommand


class Command(IsolatableCommand):
    help = "Echo, isolated."

    def add_arguments(self, parser):
        parser.add_argument("--key", default=None)
        parser.add_argument("--marker", default=None, help="File that handle() appends to.")
        parser.add_argument("--seconds", type=float, default=0.0)

    def get_isolation_id(self, *args, **options):
        return options["key"]

    def handle(self, *args, **options):
        if options["marker"]:
            with Path(options["marker"]).open("a") as marker:
                marker.write("ran\n")
        time.sleep(options["seconds"])
        self.stdout.write(f"echo {options['key']}")
