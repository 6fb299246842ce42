"""The rows of ``manage.py locks status``: the table and the JSON list, written as they are read.

A store's ``list()`` streams its holders, and so do these writers: memory stays flat whatever
the number of locks. The table sizes its columns by the first ``BATCH`` rows; when there are
more, the sizes are capped at ``CAP`` (a longer cell further down widens its own line only) and
the LABEL and MODE columns (and FENCING at ``-v 2``) are always shown, since the rows that would
need them may come later.
A table of up to ``BATCH`` rows is exactly what it would be if every row were loaded first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from typing import Any

from django.core.management.base import OutputWrapper

from django_isolatable.backends import Backend
from django_isolatable.command import duration
from django_isolatable.holders import LockInfo, is_alive, printable, utcnow

COLUMNS = ("NAME", "STATE", "PID", "HOST", "STARTED (UTC)", "AGE", "COMMAND")
#: The column that ``-v 2`` adds before COMMAND.
TOKEN = "TOKEN"
#: The column added after TOKEN (verbosity 2) when a holder was issued a fencing token.
FENCING = "FENCING"
#: The column added before COMMAND when a holder has a label.
LABEL = "LABEL"
#: The column added before COMMAND when a holder is not a plain lock's (shared, semaphore).
MODE = "MODE"
ELLIPSIS = "\u2026"
#: Rows that the table's column widths are computed from.
BATCH = 1000
#: The widest a column is made when more than BATCH rows stream.
CAP = 48
#: What ``--older-than`` takes, for its help and its error.
AGE_FORMS = "90s, 15m, 2h, 1d or plain seconds"
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

Holders = Iterable[tuple[str, "LockInfo | None"]]


class Judge:
    """``holders.judged`` for one listing: the holder of many locks is looked at once (a
    judgement is at most one listing old), remembering up to ``KEEP`` processes."""

    KEEP = 4096

    def __init__(self) -> None:
        self._seen: dict[tuple[object, ...], bool | None] = {}

    def __call__(self, info: LockInfo) -> LockInfo:
        if info.alive is not None:
            return info
        key = (info.host_id, info.pid, info.process_started_at)
        if key in self._seen:
            alive = self._seen[key]
        else:
            if len(self._seen) >= self.KEEP:
                self._seen.clear()
            alive = self._seen[key] = is_alive(info)
        return dataclasses.replace(info, alive=alive)


def age_limit(value: str) -> float:
    """``--older-than``'s value in seconds: ``90s``, ``15m``, ``2h``, ``1d`` or ``42.5``."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*", value.lower())
    if found is None:
        raise argparse.ArgumentTypeError(f"expected a duration ({AGE_FORMS}), got {value!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def state_of(info: LockInfo | None) -> str:
    """``held``, ``stale`` (holder proven dead or lease expired) or ``free``."""
    if info is None:
        return "free"
    return "stale" if info.alive is False else "held"


def age_of(info: LockInfo) -> float | None:
    return None if info.acquired_at is None else (utcnow() - info.acquired_at).total_seconds()


def older_than(holders: Holders, limit: float) -> Iterator[tuple[str, LockInfo | None]]:
    """The holders that have held their lock longer than ``limit`` seconds (no free names)."""
    for name, info in holders:
        age = None if info is None else age_of(info)
        if age is not None and age > limit:
            yield name, info


def write_json(out: OutputWrapper, holders: Holders, strategy: str, *, compact: bool) -> int:
    """The JSON list, one object at a time (indented as ``json.dumps(..., indent=2)`` would,
    or on one line when ``compact``); the number of objects."""
    count = 0
    for name, info in holders:
        # ensure_ascii: exact JSON that any stdout can carry, lone surrogates included.
        if compact:
            text = ("[" if count == 0 else ", ") + json.dumps(as_json(name, info, strategy))
        else:
            item = json.dumps(as_json(name, info, strategy), indent=2).replace("\n", "\n  ")
            text = ("[\n  " if count == 0 else ",\n  ") + item
        out.write(text, ending="")
        count += 1
    out.write("[]" if count == 0 else ("]" if compact else "\n]"))
    return count


def write_table(
    out: OutputWrapper,
    holders: Holders,
    *,
    styles: dict[str, Any],
    heading: Any,
    verbosity: int,
    width: int | None,
) -> int:
    """The table (nothing when there are no holders); the number of rows."""
    rows = iter(holders)
    first = list(islice(rows, BATCH))
    if not first:
        return 0
    following = next(rows, None)
    streamed = following is not None
    extra: list[tuple[str, Callable[[LockInfo | None], str]]] = []
    if verbosity >= 2:
        extra.append((TOKEN, _token))
        if streamed or any(info is not None and info.fencing_token for _, info in first):
            extra.append((FENCING, _fencing))
    if streamed or any(info is not None and info.label for _, info in first):
        extra.append((LABEL, label_cell))
    if streamed or any(info is not None and info.mode != "exclusive" for _, info in first):
        extra.append((MODE, mode_cell))
    header = (*COLUMNS[:-1], *(column for column, _ in extra), COLUMNS[-1])

    def cells(name: str, info: LockInfo | None) -> tuple[str, ...]:
        row = row_of(name, info)
        return (*row[:-1], *(cell(info) for _, cell in extra), row[-1])

    batch = [cells(name, info) for name, info in first]
    widths = [max(len(row[i]) for row in [header, *batch]) for i in range(len(header) - 1)]
    if streamed:
        widths = [min(size, CAP) for size in widths]
    out.write(_line(header, widths, width), heading)
    for row in batch:
        out.write(_line(row, widths, width), styles[row[1]])
    count = len(batch)
    for name, info in chain([following], rows) if following is not None else ():
        row = cells(name, info)
        out.write(_line(row, widths, width), styles[row[1]])
        count += 1
    return count


def held_under(backend: Backend, name: str) -> str:
    """``"; held: import:a, import:b (release them by name)"`` for the held locks named
    ``name:...`` (``get_isolation_id`` suffixes), or ``""``: one listing, asked for only when
    ``name`` itself is not locked."""
    try:
        held = sorted({info.name for info in backend.list() if info.name.startswith(name + ":")})
    except NotImplementedError:  # a backend that cannot list its locks
        return ""
    if not held:
        return ""
    return f"; held: {', '.join(printable(n) for n in held)} (release them by name)"


def silence_stdout() -> None:
    """Point the process's stdout at /dev/null: its reader is gone, and the interpreter's last
    flush would fail again, with a traceback."""
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def who(info: LockInfo) -> str:
    return f"pid {info.pid if info.pid is not None else '?'} on {printable(info.hostname or '?')}"


def _line(cells: Iterable[str], widths: list[int], width: int | None) -> str:
    """The cells padded to their column's width; a line longer than ``width`` (when given) is
    cut to it, its last character an ellipsis."""
    *fixed, last = cells
    line = "  ".join(cell.ljust(size) for cell, size in zip(fixed, widths, strict=True))
    line += "  " + last
    if width is not None and len(line) > width:
        return line[: max(width - 1, 0)] + ELLIPSIS
    return line


def _token(info: LockInfo | None) -> str:
    if info is None:
        return "-"
    return "?" if info.token is None else printable(info.token)


def mode_cell(info: LockInfo | None) -> str:
    if info is None:
        return "-"
    return info.mode if info.mode != "semaphore" else f"{info.mode} of {info.max_holders}"


def _fencing(info: LockInfo | None) -> str:
    return "-" if info is None or info.fencing_token is None else str(info.fencing_token)


def label_cell(info: LockInfo | None) -> str:
    return "-" if info is None or not info.label else printable(info.label)


def row_of(name: str, info: LockInfo | None) -> tuple[str, ...]:
    if info is None:
        return (printable(name), "free", "-", "-", "-", "-", "")
    started = "-" if info.acquired_at is None else f"{info.acquired_at:%Y-%m-%d %H:%M:%S}"
    age = age_of(info)
    return (
        printable(name),
        state_of(info),
        str(info.pid) if info.pid is not None else "?",
        printable(info.hostname or "?"),
        started,
        "-" if age is None else duration(age),
        printable(" ".join(info.argv)),
    )


def as_json(name: str, info: LockInfo | None, strategy: str) -> dict[str, Any]:
    if info is None:
        return {
            "name": name,
            "strategy": strategy,
            "state": "free",
            "pid": None,
            "host": None,
            "started_at": None,
            "age_seconds": None,
            "command": None,
            "expires_at": None,
            "label": None,
            "mode": None,
            "fencing_token": None,
        }
    return {
        "name": name,
        "strategy": info.strategy,
        "state": state_of(info),
        "pid": info.pid,
        "host": info.hostname,
        "started_at": None if info.acquired_at is None else info.acquired_at.isoformat(),
        "age_seconds": age_of(info),
        "command": " ".join(info.argv),
        "expires_at": None if info.expires_at is None else info.expires_at.isoformat(),
        "label": info.label,
        "mode": info.mode,
        "fencing_token": info.fencing_token,
    }


def terminal_width() -> int | None:
    """The terminal's width; None (no cut) when it reports none: a pseudo-terminal whose size
    was never set says 0 columns, which Python before 3.11 passes on."""
    columns = shutil.get_terminal_size().columns
    return columns if columns > 0 else None
