"""A test app whose one migration can hold a ``migrate`` run half-way, until it is told to go.

With ``ISOLATABLE_MIGRATE_GATE=1`` in the environment, applying ``0001_gate`` prints
``at-gate <pid>`` on its own line of stdout and waits for a ``go`` line on stdin; the
migrations it depends on are applied by then, the rest of the schema is not.
"""
