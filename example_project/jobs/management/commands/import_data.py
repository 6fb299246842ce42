"""A slow import that must never run twice at once: `manage.py import_data --seconds 30`."""

import time

from django_isolatable import IsolatableCommand


class Command(IsolatableCommand):
    help = "Import the nightly customer feed (simulated with --seconds of work)."

    def add_arguments(self, parser):
        parser.add_argument("--seconds", type=float, default=5.0, help="How long the work takes.")

    def handle(self, *args, **options):
        self.stdout.write(f"import_data: importing for {options['seconds']:g} s...")
        try:
            deadline = time.monotonic() + options["seconds"]
            while time.monotonic() < deadline:
                time.sleep(0.05)
            self.stdout.write(self.style.SUCCESS("import_data: done."))
        finally:
            self.stdout.write("import_data: cleanup ran.")
