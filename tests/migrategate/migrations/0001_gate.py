import os
import sys

from django.db import migrations, models


def wait_at_gate(apps, schema_editor):
    if os.environ.get("ISOLATABLE_MIGRATE_GATE") != "1":
        return
    print(f"\nat-gate {os.getpid()}", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise RuntimeError("expected 'go' on stdin")


class Migration(migrations.Migration):
    dependencies = [("contenttypes", "0002_remove_content_type_name")]  # noqa: RUF012
    operations = [  # noqa: RUF012
        migrations.RunPython(wait_at_gate, migrations.RunPython.noop),
        migrations.CreateModel(
            "Ticket",
            [
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                )
            ],
        ),
    ]
