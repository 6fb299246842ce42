"""Holder liveness: dead only with proof (same host, boot, PID namespace and clock frame)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from django_isolatable.holders import (
    LockInfo,
    from_epoch_microseconds,
    host_id,
    is_alive,
    new_record,
    process_started_at,
)


@pytest.fixture
def sleeper():
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def record_of(pid: int, **changes):
    """A record naming ``pid`` with its real start time, as its holder would have written it."""
    info = dataclasses.replace(
        new_record("x", "file"),
        pid=pid,
        process_started_at=process_started_at(pid),
        alive=None,
    )
    return dataclasses.replace(info, **changes)


def test_this_process_is_alive():
    assert is_alive(dataclasses.replace(new_record("x", "file"), alive=None)) is True


def test_live_pid_with_its_start_time_is_alive(sleeper):
    assert is_alive(record_of(sleeper.pid)) is True


def test_reused_pid_is_dead(sleeper):
    info = record_of(sleeper.pid)
    reused = dataclasses.replace(info, process_started_at=info.process_started_at - timedelta(1))
    assert is_alive(reused) is False


def test_gone_pid_is_dead(sleeper):
    info = record_of(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    assert is_alive(info) is False


def test_another_host_boot_or_namespace_cannot_be_judged(sleeper):
    for other in ("boot=another pid:[1] btime=1", host_id().replace("pid:[", "pid:[9"), "x"):
        assert is_alive(record_of(sleeper.pid, host_id=other)) is None


def test_a_stepped_wall_clock_never_makes_a_live_holder_look_dead(sleeper):
    """Stepping the clock moves the kernel's boot time, which start times are computed from: a
    record written an hour of clock ago carries both its start time and its boot time an hour
    earlier. The holder is still alive; a reused PID is still dead."""
    info = record_of(sleeper.pid)
    machine, btime = host_id().rsplit(" btime=", 1)
    before_step = dataclasses.replace(
        info,
        host_id=f"{machine} btime={int(btime) - 3600}",
        process_started_at=info.process_started_at - timedelta(hours=1),
    )
    assert is_alive(before_step) is True
    reused = dataclasses.replace(
        before_step, process_started_at=before_step.process_started_at - timedelta(seconds=5)
    )
    assert is_alive(reused) is False
    sleeper.kill()
    sleeper.wait()
    assert is_alive(before_step) is False


def test_unknown_fields_cannot_be_judged():
    info = dataclasses.replace(new_record("x", "file"), alive=None)
    assert is_alive(dataclasses.replace(info, pid=None)) is None
    assert is_alive(dataclasses.replace(info, process_started_at=None)) is None
    assert is_alive(dataclasses.replace(info, host_id=None)) is None
    assert os.getpid() == info.pid


@pytest.mark.parametrize(
    "name", ["x", "tenant:ünïcode", "emoji 🔒", "lone \udc80 surrogate", 'q"uo\\te']
)
@pytest.mark.parametrize("ttl", [None, 30.0])
def test_a_new_record_is_this_process_taking_the_lock_now(name, ttl):
    info = new_record(name, "file", ttl=ttl)
    assert info.name == name
    assert info.token
    assert info.pid == os.getpid()
    assert info.alive is True
    assert (info.expires_at is None) == (ttl is None)


@pytest.mark.parametrize(
    "name", ["x", "tenant:ünïcode", "emoji 🔒", "lone \udc80 surrogate", 'q"uo\\te']
)
@pytest.mark.parametrize("ttl", [None, 30.0])
def test_a_json_record_is_one_line_of_utf8_and_reads_back_as_written(name, ttl):
    info = new_record(name, "redis", ttl=ttl)
    text = info.to_json()
    assert text.endswith("\n")
    assert "\n" not in text[:-1]
    text.encode()  # always valid UTF-8, lone surrogates included
    assert json.loads(text) == info.to_dict()
    again = LockInfo.from_json(name, "redis", text)
    assert dataclasses.replace(again, alive=True) == info


@pytest.mark.parametrize("name", ["x", "lone \udc80 surrogate"])
@pytest.mark.parametrize("fencing_token", [None, 1, 2**63 - 1])
def test_a_json_record_keeps_the_holders_fencing_token(name, fencing_token):
    info = dataclasses.replace(new_record(name, "redis"), fencing_token=fencing_token)
    text = info.to_json()
    assert json.loads(text).get("fencing_token") == fencing_token
    assert info.to_dict()["fencing_token"] == fencing_token
    assert LockInfo.from_json(name, "redis", text).fencing_token == fencing_token
    # What the redis strategy's script writes when it counts the token itself:
    counted = info.fenced_json_prefix() + "42}\n"
    assert counted == dataclasses.replace(info, fencing_token=42).to_json()


@pytest.mark.parametrize("value", [0, -1, 2**63, 10**100, True, 1.5, "7", [], None])
def test_a_malformed_fencing_token_reads_as_none(value):
    data = {**new_record("x", "redis").to_dict(), "fencing_token": value}
    assert LockInfo.from_dict("x", "redis", data).fencing_token is None


def test_json_records_of_other_processes_carry_their_own_process_fields():
    mine = new_record("x", "file")
    others = [
        dataclasses.replace(mine, pid=1, argv=("other", "--option")),
        dataclasses.replace(mine, hostname=None, host_id=None, argv=("lone \udc80",)),
        LockInfo(name="x", strategy="file"),
    ]
    for info in [mine, *others, mine]:
        assert json.loads(info.to_json()) == info.to_dict()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1795896665847315", datetime(2026, 11, 28, 20, 11, 5, 847315, tzinfo=timezone.utc)),
        ("0", None),
        ("", None),
        ("-5", None),
        ("12x", None),
        ("9" * 30, None),  # overflows a datetime: not a time this code wrote
    ],
)
def test_server_times_in_microseconds(text, expected):
    assert from_epoch_microseconds(text) == expected


def test_server_times_are_exact_to_the_microsecond():
    """The float division it uses agrees with exact timedelta arithmetic up to the year 2200."""
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    rng = random.Random(20261128)
    for microseconds in [
        1,
        999_999,
        1_000_001,
        *(rng.randrange(7_258_118_400_000_000) for _ in range(20_000)),
    ]:
        expected = epoch + timedelta(microseconds=microseconds)
        assert from_epoch_microseconds(str(microseconds)) == expected, microseconds


def test_a_forked_child_records_its_own_process():
    parent = new_record("fork", "file")
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write its record's pid and start time, and leave at once
        child = new_record("fork", "file")
        os.write(writer, json.dumps([child.pid, child.process_started_at.isoformat()]).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as f:
        child_pid, started = json.loads(f.read())
    os.waitpid(pid, 0)
    assert child_pid == pid != parent.pid
    assert datetime.fromisoformat(started) >= parent.process_started_at
    assert new_record("fork", "file").pid == os.getpid()


def test_a_postgres_session_label_with_a_foreign_time_reads_as_unknown_time():
    from django_isolatable.backends.pgholders import read_record

    query = 'SELECT 1 /*isolatable:{"name": "x", "pid": 1}*/'
    record = read_record(query, "isolatable tok " + "9" * 30, "postgres")
    assert record is not None
    assert record.token == "tok"
    assert record.acquired_at is None


@pytest.mark.parametrize("name", ["short", "n" * 200, "ü" * 300])
def test_a_postgres_record_fits_what_pg_stat_activity_keeps_of_every_statement(name):
    """pg_stat_activity.query keeps 1023 bytes by default: whichever statement the holding
    session ran last, the record in its comment reads back whole, whatever its length."""
    pytest.importorskip("psycopg")
    from django_isolatable.backends import postgres
    from django_isolatable.backends.pgholders import read_record

    for length, (mode, count), fenced in itertools.product(
        range(0, 1200, 5),  # command lines around every length the budget cuts at
        [("exclusive", 1), ("semaphore", 10_000), ("shared", 1)],
        [None, 2**63 - 1],  # before and after the holder read its fencing token
    ):
        record = new_record(name, "postgres", mode=mode, max_holders=count)
        info = dataclasses.replace(record, argv=("a" * length,), fencing_token=fenced)
        named = postgres._named("", name, info)
        for statement in (named.try_lock, named.wait, named.holds):
            kept = statement.encode()[:1023].decode()
            record = read_record(kept, "isolatable tok 1795896665847315", "postgres")
            assert record is not None, (length, statement[:40])
            assert (record.pid, record.host_id) == (info.pid, info.host_id)
            assert (record.mode, record.max_holders) == (mode, count)
            assert record.fencing_token == fenced
