"""``django_isolatable.contrib.migrate``: Django's ``migrate`` waiting by default, per database.

The process tests run ``python -m django`` with tests/migrate_settings.py (the app first in
INSTALLED_APPS) on databases made for the test: an empty PostgreSQL database, or SQLite files.
``tests.migrategate`` has one migration that, with ``ISOLATABLE_MIGRATE_GATE=1``, stops its run
half-way until the test says go, so "while the first run is migrating" is an event the test
awaits, not a sleep. Every output line of every process lands in one queue; the tests await
lines. Every process is killed and every database dropped at the end of its test.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command, get_commands, load_command_class
from django.core.management.commands import migrate
from django.db import connections
from django.test import override_settings

from django_isolatable import CommandIsolation
from django_isolatable.contrib.migrate.management.commands.migrate import Command
from tests import services
from tests.processes import Worker

ROOT = Path(__file__).resolve().parent.parent
HOSTNAME = socket.gethostname()
EVENT_TIMEOUT = 60.0  # seconds to await a line: migrations on a busy machine, or a hang
POSTGRES = {
    "ENGINE": "django.db.backends.postgresql",
    "USER": os.environ.get("TEST_POSTGRES_USER", "postgres"),
    "PASSWORD": os.environ.get("TEST_POSTGRES_PASSWORD", ""),
    "HOST": os.environ.get("TEST_POSTGRES_HOST", "127.0.0.1"),
    "PORT": os.environ.get("TEST_POSTGRES_PORT", "5432"),
}
_numbers = itertools.count()


class Project:
    """``python -m django`` processes of the test project; each output line goes, with its
    process and stream, into one queue, so a test awaits a line from any of them."""

    def __init__(self, database: dict[str, Any], isolatable: dict[str, Any]) -> None:
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.migrate_settings",
            "ISOLATABLE_MIGRATE_DATABASE": json.dumps(database),
            "ISOLATABLE_TEST_SETTINGS": json.dumps(isolatable),
        }
        self.env.pop("ISOLATABLE_MIGRATE_GATE", None)
        self.lines: queue.Queue[tuple[subprocess.Popen[str], str, str]] = queue.Queue()
        self.output: dict[int, dict[str, list[str]]] = {}
        self.started: list[tuple[subprocess.Popen[str], list[threading.Thread]]] = []

    def start(self, *args: str, gate: bool = False) -> subprocess.Popen[str]:
        env = {**self.env, "ISOLATABLE_MIGRATE_GATE": "1"} if gate else self.env
        process = subprocess.Popen(
            [sys.executable, "-m", "django", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.output[process.pid] = {"stdout": [], "stderr": []}
        readers = [
            threading.Thread(target=self._read, args=(process, stream), daemon=True)
            for stream in ("stdout", "stderr")
        ]
        for reader in readers:
            reader.start()
        self.started.append((process, readers))
        return process

    def _read(self, process: subprocess.Popen[str], stream: str) -> None:
        for line in getattr(process, stream):
            self.output[process.pid][stream].append(line.rstrip("\n"))
            self.lines.put((process, stream, line.rstrip("\n")))

    def await_line(self, pattern: str) -> tuple[subprocess.Popen[str], re.Match[str]]:
        """The first line still unread, of any process and stream, that ``pattern`` matches."""
        while True:
            try:
                process, _, line = self.lines.get(timeout=EVENT_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} within {EVENT_TIMEOUT} s: {self}")
            match = re.match(pattern, line)
            if match:
                return process, match

    def go(self, process: subprocess.Popen[str]) -> None:
        """Let ``process``, waiting at the gate, go on."""
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()

    def finish(self, process: subprocess.Popen[str]) -> tuple[int, str, str]:
        """Wait for ``process`` to exit; its exit status, stdout and stderr."""
        status = process.wait(EVENT_TIMEOUT)
        for started, readers in self.started:
            if started is process:
                for reader in readers:
                    reader.join(EVENT_TIMEOUT)
        output = self.output[process.pid]
        return status, "\n".join(output["stdout"]), "\n".join(output["stderr"])

    def close(self) -> None:
        for process, readers in self.started:
            if process.poll() is None:
                process.kill()
            process.wait(EVENT_TIMEOUT)
            for reader in readers:
                reader.join(EVENT_TIMEOUT)
            assert process.stdin is not None
            process.stdin.close()

    def __str__(self) -> str:
        return json.dumps(self.output, indent=1)


@pytest.fixture
def empty_postgres_database() -> Iterator[dict[str, Any]]:
    """The settings of a PostgreSQL database created empty for this test (and its test
    database's, ``test_<name>``, if a test run made one), dropped afterwards."""
    services.require("postgres")
    import psycopg
    from psycopg import sql

    name = f"isolatable_migrate_{os.getpid()}_{next(_numbers)}"
    server = {
        "host": POSTGRES["HOST"],
        "port": POSTGRES["PORT"],
        "user": POSTGRES["USER"],
        "password": POSTGRES["PASSWORD"],
        "dbname": "postgres",
    }
    with psycopg.connect(**server, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield {**POSTGRES, "NAME": name}
    finally:
        with psycopg.connect(**server, autocommit=True) as connection:
            for database in (name, f"test_{name}"):
                connection.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(database)
                    )
                )


@pytest.fixture
def project_for() -> Iterator[Any]:
    """``project_for(database, isolatable)``: a ``Project``, closed after the test."""
    projects: list[Project] = []

    def make(database: dict[str, Any], isolatable: dict[str, Any]) -> Project:
        projects.append(Project(database, isolatable))
        return projects[-1]

    yield make
    for project in projects:
        project.close()


def strategy_settings(strategy: str, tmp_path: Path) -> dict[str, Any]:
    if strategy == "file":  # a LOCK_DIR shared by the processes, as on one machine
        return {"STRATEGY": "file", "LOCK_DIR": str(tmp_path / "locks")}
    return {"STRATEGY": strategy}


def waiting_line(name: str, pid: int) -> str:
    """The pattern of a waiting run's progress line: it names the lock and its holder."""
    return rf"Waiting for {re.escape(name)} \(pid {pid} on {re.escape(HOSTNAME)} since "


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["file", "postgres", "database"])
def test_two_replicas_migrating_an_empty_database_both_return_once_the_schema_is_ready(
    strategy: str, empty_postgres_database: dict[str, Any], project_for: Any, tmp_path: Path
) -> None:
    name = f"migrate:{empty_postgres_database['NAME']}"
    project = project_for(empty_postgres_database, strategy_settings(strategy, tmp_path))
    replicas = [project.start("migrate", "--noinput", gate=True) for _ in range(2)]

    first, gate = project.await_line(r"at-gate (\d+)$")  # the schema is half made now
    assert int(gate[1]) == first.pid
    second = replicas[1] if first is replicas[0] else replicas[0]
    waiter, _ = project.await_line(waiting_line(name, first.pid))
    assert waiter is second
    assert second.poll() is None
    project.go(first)

    status, stdout, stderr = project.finish(first)
    assert status == 0, stderr
    for migration in (
        "contenttypes.0001_initial",
        "migrategate.0001_gate",
        "sessions.0001_initial",
    ):
        assert f"Applying {migration}..." in stdout
    status, stdout, stderr = project.finish(second)
    assert status == 0, stderr
    assert stdout.splitlines()[-1] == "  No migrations to apply."
    assert "Applying" not in stdout


@pytest.mark.slow
@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_a_test_run_migrates_its_test_database_while_a_development_migrate_runs(
    database: str, request: pytest.FixtureRequest, project_for: Any, tmp_path: Path
) -> None:
    if database == "postgres":
        settings = request.getfixturevalue("empty_postgres_database")
    else:  # files, since migrating an in-memory test database takes no lock at all
        settings = {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(tmp_path / "development.sqlite3"),
            "TEST": {"NAME": str(tmp_path / "test.sqlite3")},
        }
    project = project_for(settings, strategy_settings("file", tmp_path))
    development = project.start("migrate", "--noinput", gate=True)
    project.await_line(r"at-gate \d+$")  # it holds migrate:<development NAME>

    test_run = project.start("test", "--noinput", "tests.migrategate.smoke")
    status, _, stderr = project.finish(test_run)
    assert status == 0, stderr
    assert "Ran 1 test" in stderr
    assert stderr.splitlines()[-2:] == ["OK", "Destroying test database for alias 'default'..."]
    assert development.poll() is None  # the test run did not wait for it

    project.go(development)
    assert project.finish(development)[0] == 0


HELD = r"\(pid {pid} on {host} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)"


@pytest.mark.parametrize(
    ("options", "status", "line"),
    [
        (
            ["--wait", "0", "--isolated-exit-code", "3"],
            3,
            "{name} is already running {held}; skipped.",
        ),
        (
            ["--wait", "0.5"],
            1,
            "Gave up waiting for {name} after 0.5 s: it is still running {held}; wait longer or "
            "see `manage.py locks status {name}`.",
        ),
    ],
)
def test_wait_and_isolated_exit_code_still_work(
    options: list[str], status: int, line: str, project_for: Any, tmp_path: Path
) -> None:
    database = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp_path / "db.sqlite3")}
    isolatable = strategy_settings("file", tmp_path)
    name = f"migrate:{database['NAME']}"
    holder = Worker(
        tmp_path / "holder.stderr",
        "hold",
        name,
        isolatable["LOCK_DIR"],
        env={"ISOLATABLE_TEST_SETTINGS": json.dumps(isolatable)},
    )
    try:
        holder.expect("held")
        project = project_for(database, isolatable)
        exit_status, stdout, stderr = project.finish(project.start("migrate", *options))
        assert exit_status == status
        assert stdout == ""
        held = HELD.format(pid=holder.pid, host=re.escape(HOSTNAME))
        pattern = re.escape(line.format(name=name, held="HELD")).replace("HELD", held)
        assert re.fullmatch(pattern, stderr.splitlines()[-1]), stderr
        holder.finish()
    finally:
        holder.close()


@override_settings(
    INSTALLED_APPS=["django_isolatable.contrib.migrate", "django.contrib.contenttypes"]
)
def test_the_app_provides_the_migrate_command() -> None:
    assert get_commands()["migrate"] == "django_isolatable.contrib.migrate"
    command = load_command_class("django_isolatable.contrib.migrate", "migrate")
    assert isinstance(command, Command)
    assert isinstance(command, migrate.Command)
    assert command.isolation_timeout is None


@pytest.mark.parametrize("alias", ["default", "postgres", "sqlite"])
def test_the_lock_is_named_after_the_database_name(alias: str) -> None:
    name = connections[alias].settings_dict["NAME"]
    assert Command().get_isolation_name(database=alias) == f"migrate:{name}"


def test_the_default_database_when_none_is_named() -> None:
    name = connections["default"].settings_dict["NAME"]
    assert Command().get_isolation_name() == f"migrate:{name}"


def test_a_test_database_is_locked_under_its_own_name() -> None:
    # What Django's test database creation does before it runs migrate.
    settings_dict = connections["sqlite"].settings_dict
    development_name = settings_dict["NAME"]
    settings_dict["NAME"] = f"test_{development_name}"
    try:
        assert Command().get_isolation_name(database="sqlite") == f"migrate:test_{development_name}"
    finally:
        settings_dict["NAME"] = development_name


@pytest.mark.django_db
def test_migrating_an_in_memory_database_takes_no_lock() -> None:
    name = connections["default"].settings_dict["NAME"]  # the test database, in memory
    with CommandIsolation(f"migrate:{name}").try_lock():
        call_command(Command(), wait=0, verbosity=0)
