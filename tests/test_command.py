"""IsolatableCommand through call_command(): output, propagation, naming, options."""

from __future__ import annotations

import io
import signal
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from django_isolatable import AlreadyRunning, CommandIsolation, IsolatableCommand, LockTimeout
from django_isolatable.command import Interrupted
from tests.testapp.management.commands import isolated_echo


def test_output_is_captured():
    stdout = io.StringIO()
    call_command("isolated_echo", key="k", stdout=stdout)
    assert stdout.getvalue() == "echo k\n"


def test_already_running_propagates_and_handle_is_not_called(tmp_path: Path):
    marker = tmp_path / "marker"
    with CommandIsolation("isolated_echo").lock(), pytest.raises(AlreadyRunning) as raised:
        call_command("isolated_echo", marker=str(marker))
    assert raised.value.command == "isolated_echo"
    assert not marker.exists()
    call_command("isolated_echo", marker=str(marker), stdout=io.StringIO())
    assert marker.read_text() == "ran\n"


def test_per_argument_isolation():
    with CommandIsolation("isolated_echo:a").lock():
        call_command("isolated_echo", key="b", stdout=io.StringIO())
        with pytest.raises(AlreadyRunning) as raised:
            call_command("isolated_echo", key="a")
    assert raised.value.command == "isolated_echo:a"


def test_isolation_name_overrides_the_command_name():
    with CommandIsolation("custom-name").lock(), pytest.raises(AlreadyRunning):
        call_command("named_echo")


def test_wait_gives_up_with_lock_timeout():
    with CommandIsolation("isolated_echo").lock(), pytest.raises(LockTimeout) as raised:
        call_command("isolated_echo", wait=0.2)
    assert raised.value.timeout == 0.2


def test_lock_is_released_after_the_run_and_after_an_error():
    call_command("isolated_echo", stdout=io.StringIO())
    assert not CommandIsolation("isolated_echo").is_locked()
    with pytest.raises(TypeError):  # handle() fails: time.sleep("not a number")
        call_command("isolated_echo", seconds="not a number")
    assert not CommandIsolation("isolated_echo").is_locked()


def test_lock_is_held_while_handle_runs():
    seen = []

    class Command(IsolatableCommand):
        isolation_name = "inside"

        def handle(self, *args, **options):
            seen.append(CommandIsolation("inside").holder())

    call_command(Command())
    assert seen[0] is not None
    assert seen[0].alive is True


def test_isolation_options_are_added_without_clobbering_the_commands_own():
    parser = isolated_echo.Command().create_parser("manage.py", "isolated_echo")
    options = {action.dest for action in parser._actions}
    assert {"key", "marker", "seconds", "isolation_wait", "isolated_exit_code"} <= options
    assert parser.parse_args(["--wait"]).isolation_wait == float("inf")
    assert parser.parse_args(["--wait", "2.5"]).isolation_wait == 2.5
    assert parser.parse_args([]).isolation_wait is None


@pytest.mark.parametrize("bad", [["--wait", "-1"], ["--isolated-exit-code", "256"]])
def test_bad_option_values_are_usage_errors(bad):
    with pytest.raises(CommandError, match="expected"):
        call_command("isolated_echo", *bad)


def test_isolating_an_existing_command_is_one_class():
    class Existing(BaseCommand):
        def handle(self, *args, **options):
            return "existing ran"

    class Command(IsolatableCommand, Existing):
        isolation_name = "existing"

    assert call_command(Command(), stdout=io.StringIO()) == "existing ran"
    with CommandIsolation("existing").lock(), pytest.raises(AlreadyRunning):
        call_command(Command())


def test_signal_handlers_are_restored_after_a_cli_run(capsys):
    def previous(signum, frame):
        raise AssertionError("not expected to be called")

    original = signal.signal(signal.SIGTERM, previous)
    try:
        isolated_echo.Command().run_from_argv(["manage.py", "isolated_echo"])
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, original)
    assert capsys.readouterr().out == "echo None\n"


def test_skipped_cli_run_writes_one_line_and_exits_with_the_status(capsys, settings):
    settings.ISOLATABLE = {**settings.ISOLATABLE, "SKIPPED_EXIT_CODE": 3}
    with CommandIsolation("isolated_echo").lock(), pytest.raises(SystemExit) as raised:
        isolated_echo.Command().run_from_argv(["manage.py", "isolated_echo", "--no-color"])
    assert raised.value.code == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("isolated_echo is already running (pid ")
    assert err.endswith("UTC); skipped.\n")
    assert err.count("\n") == 1


def test_interrupted_is_not_an_exception():
    """``except Exception`` in handle() must not swallow a SIGTERM."""
    assert not issubclass(Interrupted, Exception)
    assert str(Interrupted(signal.SIGTERM)) == "interrupted by SIGTERM"


def test_locks_takes_strategy_after_the_subcommand_too():
    stdout = io.StringIO()
    call_command("locks", "status", "--strategy", "memory", "--json", stdout=stdout)
    assert stdout.getvalue().strip() == "[]"


def test_handle_sees_its_guard():
    seen = []

    class Command(IsolatableCommand):
        isolation_name = "guarded"

        def handle(self, *args, **options):
            self.isolation_guard.check()
            seen.append(self.isolation_guard.info.name)

    call_command(Command())
    assert seen == ["guarded"]
