"""Command overhead: the example project's ``noop_isolated`` against ``noop_plain``.

Wall time of ``python manage.py <command>`` (a new interpreter each run, as cron starts it), the
two commands' runs interleaved in random order, with the file strategy. Also the time of one
``call_command()`` in a warm process, which leaves out interpreter start and imports.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

from benchmarks import environment
from benchmarks.report import Group, Row, median, percentile, print_table, ratio

PLAIN, ISOLATED = "noop_plain", "noop_isolated"


def _environment(lock_dir: str) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "example_project.settings",
        "ISOLATABLE_STRATEGY": "file",
        "ISOLATABLE_LOCK_DIR": lock_dir,
        "ISOLATABLE_REPORT_DRIVERS": "0",
    }


def _manage(*args: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=environment.ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def wall_times(runs: int, env: dict[str, str]) -> dict[str, list[float]]:
    """Milliseconds per ``manage.py`` run of each command (after one warm-up run each)."""
    times: dict[str, list[float]] = {PLAIN: [], ISOLATED: []}
    for command in times:
        _manage(command, env=env)
    for _ in range(runs):
        for command in random.sample(list(times), 2):
            started = time.perf_counter()
            _manage(command, env=env)
            times[command].append((time.perf_counter() - started) * 1000)
    return times


def call_command_times(calls: int) -> dict[str, list[float]]:
    """Microseconds per ``call_command()`` of each command, in this (warm) process."""
    import django
    from django.core.management import call_command

    django.setup()
    times: dict[str, list[float]] = {PLAIN: [], ISOLATED: []}
    for command in times:
        call_command(command)
    for _ in range(calls):
        for command in random.sample(list(times), 2):
            started = time.perf_counter()
            call_command(command)
            times[command].append((time.perf_counter() - started) * 1e6)
    return times


def run(runs: int) -> tuple[dict[str, list[float]], list[str]]:
    """Measure and print; return the wall times (ms) by command, and the optional drivers the
    isolated command imported."""
    env = _environment(environment.work_file("command-locks"))
    wall = wall_times(runs, env)
    in_process = json.loads(
        subprocess.run(
            [sys.executable, "-m", __name__, str(runs * 20)],
            cwd=environment.ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
    )
    report = _manage(ISOLATED, env={**env, "ISOLATABLE_REPORT_DRIVERS": "1"}).strip()
    drivers = report.removeprefix("drivers imported: ")
    groups = []
    for title, times, unit in (
        (f"python manage.py <command>, {runs} runs each (raw: {PLAIN})", wall, "ms"),
        ("call_command() in a warm process (raw: noop_plain)", in_process, "µs"),
    ):
        group = Group(title)
        base = median(times[PLAIN])
        for command, values in times.items():
            cells = [
                f"{median(values):.1f} {unit}",
                f"{percentile(values, 0.9):.1f} {unit}",
                f"{median(values) - base:+.1f} {unit}",
            ]
            group.rows.append(Row(command, cells, ratio(median(values), base)))
        groups.append(group)
    print_table(
        "Command overhead, example project, file strategy", ["median", "p90", "over plain"], groups
    )
    print(f"    optional drivers (redis, psycopg, MySQLdb ...) noop_isolated imported: {drivers}")
    return wall, [] if drivers == "none" else drivers.split(", ")


if __name__ == "__main__":  # `python -m benchmarks.commands CALLS`, in the example project
    print(json.dumps(call_command_times(int(sys.argv[1]))))
