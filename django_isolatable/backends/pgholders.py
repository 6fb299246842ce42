"""Who holds a postgres lock, and how: the record a holding session shows, and the statements
of semaphore slots and shared holds.

Each holder's session holds the name's advisory lock (its key): exclusively for a plain holder,
shared for a shared or a semaphore holder. So a plain attempt fails while any holder of another
kind holds, ``inspect`` finds every holder by that one key in ``pg_locks``, and an exclusive
locker waiting in the server's queue holds off new shared and slot holds (PostgreSQL makes a
request that conflicts with a waiting one wait, and a non-blocking one fail): writer preference.

A shared or semaphore holder holds more advisory locks, taken in this order, in one statement:
its *count lock*, ``(COUNT_CLASS, N)`` on two integer keys, shared, N its ``max_holders`` (0 for
a shared hold); its kind's *marker* (the name's semaphore marker or shared marker), shared; the
name's lock; then, for a semaphore, the first free of its N slot locks exclusively (keys hashed
from the name, see ``slot_keys``). Before the slot, it makes sure that no session holds the name
with another count: a semaphore's taker tries both markers exclusively, a shared one the
semaphore marker, until its statement ends. Getting them proves that no holder it could clash
with holds the name now, nor can take it before this statement ended (and then sees this one).
When a try fails, it looks in ``pg_locks`` for another session holding the name's lock and
another count lock, and lets go of everything if it finds one. Two takers of different counts
that race both look after taking, so at least one of them sees the other (``pg_locks`` is read
whole, at one moment): they never both stay. Markers are taken waiting, as others hold them
exclusively only to the end of a statement that waits for nothing, so takers of one count never
fail each other. A session holds one lock's locks and nothing else, so
``pg_advisory_unlock_all`` undoes a failed attempt, and releases a hold.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

from django_isolatable.backends.base import holder_count_mismatch
from django_isolatable.backends.pgsession import HELD_ALREADY, IDLE_LABEL
from django_isolatable.errors import IsolationError
from django_isolatable.holders import LockInfo, from_epoch_microseconds

_MARK = "/*isolatable:"
_PROCESS_FIELDS = ("pid", "hostname", "host_id", "process_started_at", "argv")
#: What pg_stat_activity.query keeps (track_activity_query_size, 1024 bytes by default, its NUL
#: included) minus the comment's marks: the record opens the statement, so it is never cut.
_RECORD_BUDGET = 1023 - len(_MARK) - len("*/ ")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
#: The first key of every count lock (``pg_locks.classid`` where ``objsubid`` is 2).
COUNT_CLASS = int.from_bytes(hashlib.sha256(b"django-isolatable count").digest()[:4], "big") >> 1
#: What a count lock's second key is for a shared hold.
SHARED_COUNT = 0

# A session, other than this one, that holds the name's lock (%(classid)s, %(objid)s) and a
# count lock other than %(count)s. Grouped by session, over one read of pg_locks.
_OTHER_COUNT = (
    "EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND pid <> pg_backend_pid() AND (objsubid = 1 AND classid::bigint = %(classid)s "
    "AND objid::bigint = %(objid)s OR objsubid = 2 AND classid::bigint = %(count_class)s "
    "AND objid::bigint <> %(count)s) GROUP BY pid HAVING count(DISTINCT objsubid) = 2)"
)
_LET_GO = "(SELECT '' FROM pg_advisory_unlock_all())"
#: A hold statement's answer when another count holds the name (see ``mismatch``).
OTHER_COUNT = "count"


def _hold(kind: str, alone: str, slot: str) -> str:
    """The statement of a shared or slot hold: ``kind`` the marker it holds, ``alone`` true
    when its exclusive tries of the markers show that no session can hold the name with another
    count, ``slot`` its last step (true when taken). Its answer: the new application_name
    (held), '' (taken by others), ``OTHER_COUNT``, or NULL (a pooler's session that holds a
    lock)."""
    return (
        f"SELECT CASE {HELD_ALREADY} "
        f"WHEN set_config('lock_timeout', '{MARKER_WAIT}', true) IS NULL THEN NULL "
        "WHEN NOT pg_try_advisory_lock_shared(%(count_class)s, %(count)s) THEN '' "
        f"WHEN pg_advisory_lock_shared(%({kind})s)::text <> '' THEN NULL "
        f"WHEN NOT pg_try_advisory_lock_shared(%(key)s) THEN {_LET_GO} "
        f"WHEN CASE WHEN {alone} THEN false ELSE {_OTHER_COUNT} END "
        f"THEN {_LET_GO} || '{OTHER_COUNT}' "
        f"WHEN {slot} THEN set_config('application_name', %(label)s, false) "
        f"ELSE {_LET_GO} END"
    )


#: Milliseconds a hold may wait for its marker: others hold a marker exclusively only for the
#: rest of a statement that waits for nothing.
MARKER_WAIT = 5000
_TRY_X = "pg_try_advisory_xact_lock(%({})s)"
#: The statement of each kind of hold but the plain one. A semaphore holder holds the
#: semaphore marker shared, a shared holder the shared marker. A taker that gets the markers of
#: the holders it could meet exclusively, until its statement ends, knows that none holds the
#: name, and that none can take it before this statement ended: it looks in pg_locks only when
#: a try fails. For a slot, LIMIT stops at the first slot taken: a try that fails takes nothing.
HOLD = {
    "shared": _hold("shared_marker", _TRY_X.format("marker"), "true"),
    "semaphore": _hold(
        "marker",
        f"CASE WHEN {_TRY_X.format('marker')} THEN {_TRY_X.format('shared_marker')} END",
        "(SELECT true FROM unnest(%(slots)s::int8[]) AS slot "
        "WHERE pg_try_advisory_lock(slot) LIMIT 1)",
    ),
}
#: Releases a shared or slot hold (%s: the name's key): true if the session held it.
UNLOCK_HELD = (
    "SELECT pg_advisory_unlock_shared(%s), pg_advisory_unlock_all(), "
    f"set_config('application_name', '{IDLE_LABEL}', false)"
)


def _hashed(prefix: str, name: str) -> bytes:
    """What ``name``'s key under KEY_PREFIX ``prefix`` is hashed from: the name alone without a
    prefix, else a NUL byte (which no name has), the prefix's length, the prefix and the name:
    every (prefix, name) pair its own."""
    data = name.encode("utf-8", "surrogatepass")
    if prefix:
        encoded = prefix.encode("utf-8", "surrogatepass")
        data = b"\0" + len(encoded).to_bytes(8, "big") + encoded + data
    return data


def _key(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big", signed=True)


@functools.lru_cache(maxsize=4096)
def advisory_key(prefix: str, name: str) -> int:
    """The bigint advisory lock key of ``name`` under KEY_PREFIX ``prefix``: the first 8 bytes
    of the SHA-256 of ``_hashed``."""
    return _key(_hashed(prefix, name))


def lock_ids(key: int) -> tuple[int, int]:
    """``pg_locks`` (classid, objid) of a bigint advisory lock: its high and low 32 bits."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


@functools.lru_cache(maxsize=256)
def slot_keys(prefix: str, name: str, count: int) -> str:
    """The keys of ``name``'s ``count`` slot locks, as the text of a bigint[] (which psycopg
    passes on as it is, where a list would be adapted item by item on every attempt): each
    ``advisory_key`` of the name, a NUL and the slot's number, a name no lock has (names have
    no NUL), so never another lock's key. Its markers' are those of the name, a NUL and
    "semaphore" or "shared"."""
    head = _hashed(prefix, name) + b"\0"
    return "{" + ",".join(str(_key(head + b"%d" % slot)) for slot in range(count)) + "}"


def hold_parameters(
    prefix: str, name: str, key: Any, ids: tuple[Any, Any], held: tuple[str, int]
) -> dict[str, Any]:
    """The parameters of a hold's statement but its label: ``name``'s ``key`` and ``pg_locks``
    ``ids`` (as psycopg's Int8), ``held`` its (mode, max_holders)."""
    from psycopg.types.numeric import Int4, Int8

    mode, count = held
    params = {"count_class": Int4(COUNT_CLASS), "key": key, "classid": ids[0], "objid": ids[1]}
    params["count"] = Int4(SHARED_COUNT if mode == "shared" else count)
    head = _hashed(prefix, name) + b"\0"
    params["marker"] = Int8(_key(head + b"semaphore"))
    params["shared_marker"] = Int8(_key(head + b"shared"))
    if mode == "semaphore":
        params["slots"] = slot_keys(prefix, name, count)
    return params


def mismatch(name: str, holders: list[LockInfo], asked: int) -> IsolationError | None:
    """The error for a taker of ``asked`` holders that met ``holders`` recording another count
    (shared holds are waited for, as an exclusive hold is); None if none does (any more)."""
    for holder in holders:
        if holder.mode != "shared" and holder.max_holders != asked:
            return holder_count_mismatch(name, holder.max_holders, asked)
    return None


def record_comment(
    name: str,
    process: tuple[Any, ...],
    label: str | None,
    held: tuple[str, int],
    fencing_token: int | None = None,
) -> str:
    """The record's process fields, label, mode and max_holders (``held``), and its fencing
    token once issued, as the comment that opens a statement, the same for every lock of a
    name, label and kind in a process (so its statements get prepared). A long command line is
    left out first, then the label, then a long name (``inspect`` knows the name it asks for).
    JSON's "\\u002a" for "*" keeps the comment closed and unnested (PostgreSQL nests ``/*``),
    "\\u0025" for "%" keeps psycopg's placeholders out."""
    data = {"name": name, **dict(zip(_PROCESS_FIELDS, process, strict=True)), "label": label}
    data.update(mode=held[0], max_holders=held[1])
    if fencing_token is not None:
        data["fencing_token"] = fencing_token
    text = ""
    for dropped in ((), ("argv",), ("argv", "label"), ("argv", "label", "name")):
        data.update(dict.fromkeys(dropped))
        text = json.dumps(data, default=datetime.isoformat)  # ASCII only
        text = text.replace("*", "\\u002a").replace("%", "\\u0025")
        if len(text) <= _RECORD_BUDGET:
            break
    return f"{_MARK}{text}*/ "


def read_record(query: str, application_name: str, strategy: str) -> LockInfo:
    """The record a holding session shows: the token and time from its label, the rest from
    its statement's comment (unknown without one, as another role sees it)."""
    start = query.find(_MARK)
    end = query.find("*/", start)
    data = None
    if start >= 0 and end >= 0:
        with contextlib.suppress(ValueError):
            data = json.loads(query[start + len(_MARK) : end])
    name = data.get("name") if isinstance(data, dict) else None
    info = LockInfo.from_dict(name if isinstance(name, str) else "", strategy, data)
    _, token, microseconds = [*application_name.split(" "), "", "", ""][:3]
    return replace(info, token=token or None, acquired_at=from_epoch_microseconds(microseconds))


def session_label(info: LockInfo) -> str:
    """The application_name of the session holding ``info``'s lock (at most 60 bytes)."""
    taken = info.acquired_at or _EPOCH
    return f"isolatable {info.token or ''} {(taken - _EPOCH) // _MICROSECOND}"


# Who holds the locks of this database: for locks status, and to force-release.
GRANTED = (  # the granted advisory locks of this database, and the sessions holding them
    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
    "AND l.granted AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database "
    "WHERE datname = current_database())"
)
HOLDERS = f"SELECT l.classid::bigint, l.objid::bigint, a.query, a.application_name {GRANTED}"
ONE_NAME = " AND l.classid::bigint = %(classid)s AND l.objid::bigint = %(objid)s"
# Waits up to 5 s for each session to end (PostgreSQL 14+), so the lock is free after.
TERMINATE = (
    f"SELECT coalesce(bool_or(pg_terminate_backend(l.pid, 5000)), false) {GRANTED}{ONE_NAME} "
    "AND l.pid <> pg_backend_pid() AND (%(token)s::text IS NULL "
    "OR split_part(a.application_name, ' ', 2) = %(token)s)"
)
