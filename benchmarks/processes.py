"""Forked worker processes that report back through a pipe, and are never left behind."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.context import ForkProcess
from typing import Any

from django.db import connections

from benchmarks.candidates import WAIT_LIMIT

CONTEXT = multiprocessing.get_context("fork")


class WorkerFailed(Exception):
    pass


def _run(target: Callable[..., None], connection: Connection, args: tuple[Any, ...]) -> None:
    try:
        target(connection, *args)
    except BaseException:
        connection.send(WorkerFailed(traceback.format_exc()))


@contextmanager
def workers(target: Callable[..., None], count: int, *args: Any) -> Iterator[list[Connection]]:
    """Start ``count`` processes running ``target(connection, *args)``; yield our ends.

    The ORM's connections are closed first, so no child shares their sockets. On the way out
    every child is joined (terminated at once if the caller failed), and killed if it does
    not end.
    """
    connections.close_all()
    pipes = [CONTEXT.Pipe() for _ in range(count)]
    processes: list[ForkProcess] = []
    patience = 0.0
    try:
        for _, theirs in pipes:
            process = CONTEXT.Process(target=_run, args=(target, theirs, args), daemon=True)
            process.start()
            processes.append(process)
            theirs.close()
        yield [ours for ours, _ in pipes]
        patience = WAIT_LIMIT
    finally:
        for process in processes:
            process.join(patience)
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        for ours, _ in pipes:
            ours.close()


def receive(connection: Connection) -> Any:
    """The worker's next message; raises ``WorkerFailed`` with its traceback if it failed."""
    if not connection.poll(WAIT_LIMIT):
        raise WorkerFailed(f"no answer from a worker within {WAIT_LIMIT} s")
    message = connection.recv()
    if isinstance(message, WorkerFailed):
        raise message
    return message
