"""settings.ISOLATABLE: defaults, validation, and the system checks that report bad values."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from django_isolatable import CommandIsolation, LockStrategy
from django_isolatable.backends.memory import MemoryBackend
from django_isolatable.conf import BUILTIN_STRATEGIES, MAX_TTL, is_valid_ttl, isolatable_settings
from django_isolatable.holders import new_record
from tests.strategies import STORE_CONFIGS

ROOT = Path(__file__).resolve().parent.parent


def messages() -> list[tuple[str, str]]:
    return [(m.id or "", m.msg) for m in checks.run_checks() if m.id and "isolatable" in m.id]


class CustomBackend(MemoryBackend):
    """A backend loaded by dotted path."""


def test_defaults(settings):
    settings.ISOLATABLE = {}
    assert isolatable_settings.STRATEGY == "file"
    assert isolatable_settings.TIMEOUT is None
    assert isolatable_settings.TTL == 60
    assert isolatable_settings.REDIS_URL == "redis://127.0.0.1:6379/0"
    assert isolatable_settings.KEY_PREFIX == ""
    assert isolatable_settings.SKIPPED_EXIT_CODE == 0
    user = getpass.getuser()
    assert isolatable_settings.LOCK_DIR == Path(
        tempfile.gettempdir(), f"django-isolatable-{user}-tests.settings"
    )
    assert messages() == []


def test_lock_dir_defaults_to_base_dir(settings, tmp_path):
    settings.ISOLATABLE = {}
    settings.BASE_DIR = tmp_path
    assert isolatable_settings.LOCK_DIR == tmp_path / ".locks"


def test_settings_are_read_live(settings):
    settings.ISOLATABLE = {"STRATEGY": "memory"}
    assert CommandIsolation("x").strategy == "memory"
    settings.ISOLATABLE = {"STRATEGY": LockStrategy.FILE}
    assert CommandIsolation("x").strategy == "file"


def test_remembered_values_follow_every_change_of_the_setting(settings):
    """Values are validated once, then remembered until the setting changes."""
    settings.ISOLATABLE = {"TTL": 5}
    assert isolatable_settings.TTL == 5
    assert CommandIsolation("x").ttl == 5
    settings.ISOLATABLE = {"TTL": 7}
    assert isolatable_settings.TTL == 7
    with override_settings(ISOLATABLE={"TTL": 0}):
        with pytest.raises(ImproperlyConfigured, match="TTL"):
            _ = CommandIsolation("x").ttl
        assert [m[0] for m in messages()] == ["isolatable.E005"]
    assert isolatable_settings.TTL == 7
    settings.ISOLATABLE = {}
    assert isolatable_settings.TTL == 60


@pytest.mark.parametrize(
    ("key", "value", "check_id", "message"),
    [
        (
            "STRATEGY",
            "nope",
            "isolatable.E002",
            "settings.ISOLATABLE[\"STRATEGY\"] is 'nope', which is neither a strategy (file, "
            "memory, redis, cache, database, postgres) nor the dotted path of an importable "
            "backend class.",
        ),
        (
            "TTL",
            0,
            "isolatable.E005",
            'settings.ISOLATABLE["TTL"] is 0; use a number of seconds > 0 and at most 86400 '
            "(a day): leases must expire.",
        ),
        (
            "TTL",
            float("inf"),
            "isolatable.E005",
            'settings.ISOLATABLE["TTL"] is inf; use a number of seconds > 0 and at most 86400 '
            "(a day): leases must expire.",
        ),
        (
            "TIMEOUT",
            -1,
            "isolatable.E004",
            'settings.ISOLATABLE["TIMEOUT"] is -1; use None (wait forever) or a number of '
            "seconds >= 0.",
        ),
        (
            "SKIPPED_EXIT_CODE",
            300,
            "isolatable.E007",
            'settings.ISOLATABLE["SKIPPED_EXIT_CODE"] is 300; use an exit status from 0 to 255.',
        ),
        (
            "OVERDUE_EXIT_CODE",
            -2,
            "isolatable.E014",
            'settings.ISOLATABLE["OVERDUE_EXIT_CODE"] is -2; use an exit status from 0 to 255.',
        ),
        (
            "MAX_AGE",
            "15m",
            "isolatable.E013",
            "settings.ISOLATABLE[\"MAX_AGE\"] is '15m'; use None (no limit) or the number of "
            "seconds after which a holder is overdue (> 0).",
        ),
        (
            "KEY_PREFIX",
            None,
            "isolatable.E006",
            'settings.ISOLATABLE["KEY_PREFIX"] is None; it must be a string.',
        ),
        (
            "TTL",
            1e12,
            "isolatable.E005",
            'settings.ISOLATABLE["TTL"] is 1000000000000.0; use a number of seconds > 0 and at '
            "most 86400 (a day): leases must expire.",
        ),
        (
            "RECORD_ARGV",
            "all",
            "isolatable.E008",
            "settings.ISOLATABLE[\"RECORD_ARGV\"] is 'all'; use one of 'full', 'command', 'none'.",
        ),
        (
            "RECORD_ARGV",
            None,
            "isolatable.E008",
            "settings.ISOLATABLE[\"RECORD_ARGV\"] is None; use one of 'full', 'command', 'none'.",
        ),
    ],
)
def test_bad_values_are_check_errors_and_improperly_configured(
    settings, key, value, check_id, message
):
    settings.ISOLATABLE = {key: value}
    assert (check_id, message) in messages()
    with pytest.raises(ImproperlyConfigured) as raised:
        getattr(isolatable_settings, key)
    assert str(raised.value) == message


def test_bad_strategy_is_improperly_configured_on_use(settings):
    settings.ISOLATABLE = {"STRATEGY": "nope"}
    with pytest.raises(ImproperlyConfigured, match="'nope', which is neither a strategy"):
        CommandIsolation("x").try_lock()


def test_a_dotted_path_that_does_not_import_gets_no_strategy_suggestion(settings):
    settings.ISOLATABLE = {"STRATEGY": "redis.X"}
    assert messages() == [
        (
            "isolatable.E002",
            "settings.ISOLATABLE[\"STRATEGY\"] is 'redis.X', which is neither a strategy "
            "(file, memory, redis, cache, database, postgres) nor the dotted path of an "
            "importable backend class.",
        )
    ]


def test_strategy_by_dotted_path(settings):
    settings.ISOLATABLE = {"STRATEGY": f"{__name__}.CustomBackend"}
    assert messages() == []
    with CommandIsolation("x").lock() as guard:
        assert isinstance(guard.isolation.backend, CustomBackend)


def test_dotted_path_that_is_not_a_backend(settings):
    settings.ISOLATABLE = {"STRATEGY": "pathlib.Path"}
    assert [m[0] for m in messages()] == ["isolatable.E002"]


def test_reading_a_dotted_path_strategy_imports_nothing_the_check_tries_it(settings):
    """Settings never import backends: the check reports a path that does not import."""
    settings.ISOLATABLE = {"STRATEGY": "tests.no_such_module.Backend"}
    assert isolatable_settings.STRATEGY == "tests.no_such_module.Backend"
    assert messages() == [
        (
            "isolatable.E002",
            "settings.ISOLATABLE[\"STRATEGY\"] is 'tests.no_such_module.Backend', which is neither "
            "a strategy (file, memory, redis, cache, database, postgres) nor the dotted path of an "
            "importable backend class.",
        )
    ]


def test_the_builtin_strategy_names_are_the_lock_strategies():
    assert BUILTIN_STRATEGIES == tuple(strategy.value for strategy in LockStrategy)


@pytest.mark.parametrize(
    ("value", "valid"),
    [(MAX_TTL, True), (0.001, True), (MAX_TTL + 0.001, False), (1e12, False), (True, False)],
)
def test_the_ttl_bound_the_constructor_shares(value, valid):
    assert is_valid_ttl(value) is valid


@pytest.mark.parametrize("config", STORE_CONFIGS, ids=lambda config: config.id)
def test_the_longest_ttl_is_one_every_store_accepts(config):
    config.require_service()
    with (
        config.override_settings(),
        override_settings(ISOLATABLE={**django_settings.ISOLATABLE, "TTL": MAX_TTL}),
    ):
        assert messages() == []
        with CommandIsolation(f"a-day-{os.getpid()}").try_lock() as guard:
            holder = guard.isolation.holder()
            assert holder is not None
            assert holder.token == guard.info.token
            if guard.info.expires_at is not None:
                taken = guard.info.expires_at - guard.info.acquired_at
                assert taken == timedelta(seconds=MAX_TTL)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("full", ["isolated_echo", "--marker", "{marker}", "--seconds", "60"]),
        ("command", ["isolated_echo"]),
        ("none", None),
    ],
)
def test_record_argv_decides_what_a_holder_record_keeps(lock_dir, tmp_path, mode, expected):
    marker = tmp_path / "marker"
    isolatable = {"LOCK_DIR": str(lock_dir), "RECORD_ARGV": mode}
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "django",
            "isolated_echo",
            "--marker",
            str(marker),
            "--seconds",
            "60",
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "ISOLATABLE_TEST_SETTINGS": json.dumps(isolatable),
        },
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():  # handle() runs: the lock is held, its record written
            assert child.poll() is None
            assert time.monotonic() < deadline, "the command never ran"
            time.sleep(0.01)
        argv = json.loads((lock_dir / "isolated_echo.lock").read_text())["argv"]
    finally:
        child.kill()
        child.wait()
    if expected is None:
        assert argv == []
    else:
        assert argv[0].endswith("__main__.py")
        assert argv[1:] == [arg.format(marker=marker) for arg in expected]


@pytest.mark.parametrize(
    ("argv", "kept"),
    [
        (["manage.py", "import_data", "--password", "hunter2"], ("manage.py", "import_data")),
        (["manage.py", "--token", "hunter2", "import_data"], ("manage.py",)),
        (["manage.py"], ("manage.py",)),
        ([], ()),
    ],
)
def test_record_argv_command_keeps_no_argument_that_may_be_an_option_value(
    settings, monkeypatch, argv, kept
):
    settings.ISOLATABLE = {"RECORD_ARGV": "command"}
    monkeypatch.setattr(sys, "argv", argv)
    assert new_record("x", "file").argv == kept


def test_isolatable_must_be_a_dict(settings):
    settings.ISOLATABLE = ["file"]
    assert messages() == [
        ("isolatable.E001", "settings.ISOLATABLE must be a dict, not list (['file']).")
    ]


KNOWN_KEYS = (
    "STRATEGY, LOCK_DIR, TIMEOUT, TTL, REDIS_URL, CACHE_ALIAS, DATABASE_ALIAS, KEY_PREFIX, "
    "SKIPPED_EXIT_CODE, RECORD_ARGV, MAX_AGE, OVERDUE_EXIT_CODE, REDIS_SENTINELS, "
    "REDIS_SENTINEL_SERVICE, REDIS_CLUSTER, REDIS_REPLICA_ACKS"
)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "STRATEGIE",
            "settings.ISOLATABLE has the unknown key 'STRATEGIE'; did you mean 'STRATEGY'?",
        ),
        (
            "strategy",
            "settings.ISOLATABLE has the unknown key 'strategy'; did you mean 'STRATEGY'?",
        ),
        ("TIMOUT", "settings.ISOLATABLE has the unknown key 'TIMOUT'; did you mean 'TIMEOUT'?"),
        (
            "EXTRA",
            "settings.ISOLATABLE has the unknown key 'EXTRA'; remove it, or use one of the known "
            f"keys: {KNOWN_KEYS}.",
        ),
        (
            1,
            "settings.ISOLATABLE has the unknown key 1; remove it, or use one of the known "
            f"keys: {KNOWN_KEYS}.",
        ),
    ],
)
def test_unknown_key_is_an_error_and_improperly_configured(settings, key, message):
    """A typo must not leave the default silently in force (``STRATEGIE`` used ``file``)."""
    settings.ISOLATABLE = {"STRATEGY": "memory", key: "redis"}
    assert messages() == [("isolatable.E009", message)]
    with pytest.raises(ImproperlyConfigured) as raised:
        CommandIsolation("x").try_lock()
    assert str(raised.value) == message
    with pytest.raises(ImproperlyConfigured) as raised:
        _ = isolatable_settings.TTL  # every setting, not only STRATEGY
    assert str(raised.value) == message


def test_unknown_keys_are_looked_for_once_per_change_of_the_settings(settings, monkeypatch):
    from django_isolatable import conf

    looked = []
    real = conf._unknown_keys

    def counted(raw):
        looked.append(1)
        return real(raw)

    monkeypatch.setattr(conf, "_unknown_keys", counted)
    settings.ISOLATABLE = {"STRATEGY": "memory"}
    for _ in range(3):
        CommandIsolation("x").try_lock().release()
    assert looked == [1]
    settings.ISOLATABLE = {"STRATEGY": "memory", "TTL": 5}
    CommandIsolation("x").try_lock().release()
    assert looked == [1, 1]


@pytest.mark.parametrize(
    ("value", "meant"), [("reddis", "redis"), ("Redis", "redis"), ("fiel", "file")]
)
def test_a_misspelt_strategy_gets_a_suggestion(settings, value, meant):
    message = (
        f'settings.ISOLATABLE["STRATEGY"] is {value!r}, which is neither a strategy (file, '
        "memory, redis, cache, database, postgres) nor the dotted path of an importable "
        f"backend class; did you mean {meant!r}?"
    )
    settings.ISOLATABLE = {"STRATEGY": value}
    assert messages() == [("isolatable.E002", message)]
    with pytest.raises(ImproperlyConfigured) as raised:
        CommandIsolation("x").try_lock()
    assert str(raised.value) == message
    settings.ISOLATABLE = {}
    with pytest.raises(ImproperlyConfigured) as raised:
        CommandIsolation("x", strategy=value).try_lock()
    assert str(raised.value) == (
        f"Unknown lock strategy {value!r}: use one of file, memory, redis, cache, database, "
        f"postgres or the dotted path of a backend class ({value} doesn't look like a module "
        f"path); did you mean {meant!r}?"
    )


def test_lock_dir_that_is_a_file_is_a_check_error(settings, tmp_path):
    (tmp_path / "f").write_text("")
    settings.ISOLATABLE = {"LOCK_DIR": str(tmp_path / "f")}
    assert messages() == [
        (
            "isolatable.E010",
            f'settings.ISOLATABLE["LOCK_DIR"] ({str(tmp_path / "f")!r}) is not a directory; '
            "point it at one.",
        )
    ]


def test_missing_lock_dir_is_fine(settings, tmp_path):
    settings.ISOLATABLE = {"LOCK_DIR": str(tmp_path / "not" / "yet")}
    assert messages() == []


@pytest.mark.parametrize("bad", [-1, "5", float("nan"), True])
def test_bad_timeouts_are_value_errors(bad):
    with pytest.raises(ValueError, match="timeout must be None"):
        CommandIsolation("x", timeout=bad)
    with pytest.raises(ValueError, match="timeout must be None"):
        CommandIsolation("x").lock(timeout=bad)


@pytest.mark.parametrize("bad", [0, -5, float("inf")])
def test_bad_ttl_is_a_value_error(bad):
    with pytest.raises(ValueError, match="ttl must be a number of seconds > 0 and at most"):
        CommandIsolation("x", ttl=bad)


def test_database_strategy_on_in_memory_sqlite_is_a_check_error(settings):
    settings.ISOLATABLE = {"STRATEGY": "database", "DATABASE_ALIAS": "default"}
    assert messages() == [
        (
            "isolatable.E041",
            "settings.ISOLATABLE[\"DATABASE_ALIAS\"] is 'default', which is an in-memory SQLite "
            "database: every connection has its own, so its locks exclude nothing. Use a "
            "database file.",
        )
    ]


@pytest.mark.parametrize(
    "backend",
    [
        "django.core.cache.backends.locmem.LocMemCache",
        "django.core.cache.backends.filebased.FileBasedCache",
        "django.core.cache.backends.db.DatabaseCache",
    ],
)
def test_cache_strategy_on_an_unsafe_cache_is_a_warning(settings, backend, tmp_path):
    location = str(tmp_path / "cache")  # the file-based cache makes this folder
    settings.CACHES = {**settings.CACHES, "unsafe": {"BACKEND": backend, "LOCATION": location}}
    settings.ISOLATABLE = {"STRATEGY": "cache", "CACHE_ALIAS": "unsafe"}
    ((check_id, message),) = messages()
    assert check_id == "isolatable.W050"
    assert f"The cache strategy uses cache 'unsafe' ({backend}), where " in message


@pytest.mark.parametrize(
    ("strategy", "module", "check_id", "extra"),
    [
        ("redis", "redis", "isolatable.E020", "redis"),
        ("postgres", "psycopg", "isolatable.E030", "postgres"),
    ],
)
def test_a_missing_driver_is_a_check_error(
    settings, monkeypatch, strategy, module, check_id, extra
):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ModuleNotFoundError
    settings.ISOLATABLE = {"STRATEGY": strategy, "DATABASE_ALIAS": "postgres"}
    assert messages() == [
        (
            check_id,
            f"The {strategy} strategy needs the {module} package: "
            f"pip install 'django-isolatable[{extra}]'.",
        )
    ]


def test_a_driver_that_fails_to_import_is_a_check_error_saying_why(settings, monkeypatch, tmp_path):
    """Installed but broken (find_spec finds it, import fails): the check says so instead of
    passing and leaving a traceback for the first lock."""
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "__init__.py").write_text("raise ImportError('broken build')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for loaded in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, loaded)
    settings.ISOLATABLE = {"STRATEGY": "redis"}
    assert messages() == [
        (
            "isolatable.E020",
            "The redis strategy needs the redis package: pip install 'django-isolatable[redis]' "
            "(it is installed but fails to import: broken build).",
        )
    ]
