"""``manage.py locks`` from a shell: Django's common options after the subcommand, ``-v``, the
terminal's width, the release hint, and a missing driver as one line."""

from __future__ import annotations

import fcntl
import io
import json
import os
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command

from django_isolatable import CommandIsolation, LockGuard
from django_isolatable.backends.file import FileBackend

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0  # seconds; only a hang should ever hit it
LONG_ARGV = ["manage.py", "import_feed", "--source", "https://feeds.example.com/" + "x" * 120]
LONG_COMMAND = " ".join(LONG_ARGV)
#: A wrapper that makes the modules named by its first argument impossible to import, as if
#: their packages were not installed, then runs manage.py with the other arguments.
WITHOUT_MODULES = """
import runpy, sys
for module in sys.argv[1].split(","):
    sys.modules[module] = None
sys.argv = ["manage.py", *sys.argv[2:]]
runpy.run_path("manage.py", run_name="__main__")
"""


def child_env(**extra: str) -> dict[str, str]:
    """A child's environment: the current ISOLATABLE settings, no COLUMNS unless given."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "ISOLATABLE_TEST_SETTINGS": json.dumps(django_settings.ISOLATABLE),
        **extra,
    }
    if "COLUMNS" not in extra:
        env.pop("COLUMNS", None)
    return env


def run_locks(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "locks", *args],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def run_locks_on_terminal(*args: str, columns: int) -> tuple[int, list[str]]:
    """``manage.py locks *args`` with stdout on a pseudo-terminal ``columns`` wide (and no
    COLUMNS variable): its exit status and the lines the terminal got."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    with subprocess.Popen(
        [sys.executable, "manage.py", "locks", *args],
        cwd=ROOT,
        env=child_env(),
        stdout=follower,
        stderr=subprocess.DEVNULL,
    ) as process:
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal's last follower
                break
            if not chunk:
                break
            output += chunk
        os.close(leader)
        status = process.wait(TIMEOUT)
    return status, output.decode().splitlines()


@pytest.fixture
def file_locks(settings, tmp_path) -> None:
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o700)
    settings.ISOLATABLE = {"STRATEGY": "file", "LOCK_DIR": str(lock_dir)}


@pytest.fixture
def long_running(file_locks, monkeypatch) -> Iterator[LockGuard]:
    """``import_feed`` held by this process, its record's command line longer than 80 columns."""
    monkeypatch.setattr(sys, "argv", LONG_ARGV)
    with CommandIsolation("import_feed").try_lock() as guard:
        yield guard


@pytest.mark.usefixtures("file_locks")
@pytest.mark.parametrize(
    "options",
    [
        ["-v", "0"],
        ["--verbosity", "2"],
        ["--no-color"],
        ["--force-color"],
        ["--settings", "tests.settings"],
        ["--pythonpath", "."],
        ["--traceback"],
    ],
)
@pytest.mark.parametrize("subcommand", [["status"], ["release", "nothing_here"]])
def test_django_options_are_taken_after_the_subcommand(subcommand, options):
    after = run_locks(*subcommand, *options)
    before = run_locks(*options, *subcommand)

    assert (after.returncode, after.stderr) == (0, "")
    assert after.stdout == before.stdout


@pytest.mark.usefixtures("file_locks")
def test_options_after_the_subcommand_take_effect():
    _, colored = run_locks_on_terminal("status", "nothing_here", columns=80)
    _, plain = run_locks_on_terminal("status", "nothing_here", "--no-color", columns=80)
    forced = run_locks("status", "nothing_here", "--force-color")
    both = run_locks("status", "--no-color", "--force-color")

    assert colored[0].startswith("\x1b[")
    assert plain[0].startswith("NAME ")
    assert forced.stdout.startswith("\x1b[")
    assert both.returncode == 1
    assert both.stderr == (
        "CommandError: The --no-color and --force-color options can't be used together.\n"
    )


@pytest.mark.usefixtures("file_locks")
def test_verbosity_0_prints_only_the_table_and_errors(long_running):
    held = run_locks("status", "-v", "0")
    free = run_locks("status", "nothing_here", "-v", "0")

    assert (held.returncode, held.stderr) == (0, "")
    assert [line.split()[:2] for line in held.stdout.splitlines()] == [
        ["NAME", "STATE"],
        ["import_feed", "held"],
    ]
    assert free.stdout.splitlines()[1].split() == ["nothing_here", "free", "-", "-", "-", "-"]
    long_running.release()
    for args in (["status"], ["release", "import_feed"], ["release", "--stale"]):
        quiet = run_locks(*args, "-v", "0")
        assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    refused = run_locks("release", "--all", "-v", "0")
    assert refused.returncode == 1
    assert refused.stderr == (
        "CommandError: locks release --all releases live holders' locks too: add --force.\n"
    )


def test_verbosity_2_names_the_strategy_and_shows_the_tokens(long_running):
    shown = run_locks("status", "-v", "2").stdout.splitlines()

    assert shown[0] == "Locks of the file strategy:"
    assert shown[1].split()[7:] == ["TOKEN", "COMMAND"]
    assert shown[2].split()[7] == long_running.info.token
    assert json.loads(run_locks("status", "--json", "-v", "2").stdout)[0]["name"] == "import_feed"


def test_the_table_fits_the_terminal(long_running):
    status, lines = run_locks_on_terminal("status", "--no-color", columns=80)

    assert status == 0
    assert [len(line) for line in lines] == [len(lines[0]), 80]
    assert lines[1].startswith("import_feed  held  ")
    assert lines[1].endswith("\u2026")
    shown = lines[1][lines[1].index("manage.py ") : -1]
    assert LONG_COMMAND.startswith(shown)


def test_wide_shows_the_whole_command_on_a_terminal(long_running):
    status, lines = run_locks_on_terminal("status", "--wide", "--no-color", columns=80)

    assert status == 0
    assert lines[1].endswith(f"  {LONG_COMMAND}")


def test_the_table_is_cut_to_columns_and_never_for_a_pipe(long_running):
    piped = run_locks("status").stdout.splitlines()
    cut = run_locks("status", COLUMNS="60").stdout.splitlines()
    wide = run_locks("status", "--wide", COLUMNS="60").stdout.splitlines()

    assert piped[1].endswith(f"  {LONG_COMMAND}")
    assert [len(line) for line in cut] == [60, 60]
    assert cut[1].endswith("\u2026")
    assert wide[1].endswith(f"  {LONG_COMMAND}")


@pytest.mark.usefixtures("file_locks")
def test_release_of_a_free_name_names_the_held_locks_under_it():
    with (
        CommandIsolation("import_feed:orders").try_lock(),
        CommandIsolation("import_feed:customers").try_lock(),
        CommandIsolation("import_feeds").try_lock(),
    ):
        released = run_locks("release", "import_feed")

        assert (released.returncode, released.stderr) == (0, "")
        assert released.stdout == (
            "import_feed is not locked; held: import_feed:customers, import_feed:orders "
            "(release them by name).\n"
        )
        assert CommandIsolation("import_feed:orders").is_locked()
        assert run_locks("release", "export").stdout == "export is not locked.\n"


@pytest.mark.usefixtures("file_locks")
def test_the_release_hint_lists_the_locks_only_when_the_name_is_not_locked(monkeypatch):
    listings = []
    real_list = FileBackend.list

    def counted_list(self):
        listings.append(1)
        return real_list(self)

    monkeypatch.setattr(FileBackend, "list", counted_list)
    stdout = io.StringIO()
    with CommandIsolation("import_feed:orders").try_lock():
        call_command("locks", "release", "import_feed:orders", "--force", stdout=stdout)
        assert listings == []
        call_command("locks", "release", "import_feed", stdout=stdout)
    assert listings == [1]


@pytest.mark.parametrize(
    ("strategy", "modules", "extra"),
    [("redis", "redis", "redis"), ("postgres", "psycopg,psycopg2", "postgres")],
)
@pytest.mark.parametrize("command", [["isolated_echo"], ["locks", "status"]])
def test_a_missing_driver_is_one_line_naming_the_extra(settings, strategy, modules, extra, command):
    """Cron jobs never run ``manage.py check``: the run itself says what to install."""
    settings.ISOLATABLE = {"STRATEGY": strategy, "DATABASE_ALIAS": "postgres"}
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_MODULES, modules, *command],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )

    assert run.returncode == 1
    assert run.stdout == ""
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stderr.startswith("CommandError: ")
    assert f"pip install 'django-isolatable[{extra}]'" in run.stderr


@pytest.mark.parametrize("command", [["isolated_echo"], ["locks", "status"]])
def test_a_redis_package_that_fails_to_import_is_one_line_naming_the_extra(
    settings, tmp_path, command
):
    """A broken install (the package is there, its import raises) used to print a traceback
    from the system checks that ``locks`` ran."""
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "__init__.py").write_text('raise ImportError("broken redis")\n')
    settings.ISOLATABLE = {"STRATEGY": "redis"}
    run = subprocess.run(
        [sys.executable, "manage.py", *command],
        cwd=ROOT,
        env=child_env(PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )

    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert "pip install 'django-isolatable[redis]'" in run.stderr
