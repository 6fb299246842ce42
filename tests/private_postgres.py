"""A PostgreSQL server of the tests' own, which a test may terminate sessions on, stop and restart.

The machine's shared server (``services.SERVERS["postgres"]``) must never be restarted: other
tests use it meanwhile. ``private_postgres()`` makes a cluster with ``initdb`` in a temporary
folder (trust authentication, fsync off) and serves it with ``pg_ctl`` on a free port of
127.0.0.1; it stops the server and removes the folder whatever happens. As root, whom ``initdb``
refuses, the server runs as the ``postgres`` user (``runuser`` or ``su``). Without the binaries,
or as root with no way to run them as another user, the test is skipped; binaries that are there
but cannot serve fail it under ISOLATABLE_REQUIRE_SERVICES=1. From initdb to serving takes about
a second; a restart a fifth of one.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.services import free_port

#: Where Debian and Ubuntu keep each major version's server binaries.
DEBIAN_BINARIES = "/usr/lib/postgresql/*/bin"
USER = "postgres"  # the database superuser initdb makes, and the system user root runs it as
DATABASE = "postgres"
START_TIMEOUT = 30  # seconds pg_ctl may wait for the server to start or stop


def binaries() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: the newest Debian version's, else the ones on
    PATH."""
    versions = sorted(
        Path("/").glob(DEBIAN_BINARIES.lstrip("/")),
        key=lambda folder: [int(part) for part in re.findall(r"\d+", folder.parent.name)],
    )
    for folder in [*reversed(versions), *(Path(p).parent for p in [shutil.which("pg_ctl")] if p)]:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


def runner() -> tuple[list[str], tuple[int, int] | None] | str:
    """How to run the server's commands: a prefix for them and the (uid, gid) that must own its
    folder (None: this user's), or why they cannot be run."""
    if os.geteuid() != 0:
        return [], None
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        return f"running as root, whom initdb refuses, and there is no {USER!r} user to run it as"
    owner = (user.pw_uid, user.pw_gid)
    if shutil.which("runuser"):
        return ["runuser", "-u", USER, "--"], owner
    if shutil.which("su"):
        return ["su", USER, "-s", "/bin/sh", "-c"], owner
    return "running as root, whom initdb refuses, and neither runuser nor su is installed"


class PrivatePostgres:
    """One cluster in ``directory``; ``start()``, ``restart()``, ``stop()`` through pg_ctl."""

    def __init__(self, folder: Path, directory: Path, prefix: list[str]) -> None:
        self.folder = folder
        self.directory = directory
        self.data = directory / "data"
        self.log = directory / "server.log"
        self.prefix = prefix
        self.port = 0
        self.startup_seconds = 0.0  # from initdb to serving

    @property
    def url(self) -> str:
        """For DATABASE_URL (django-environ), as the example project reads it."""
        return f"postgres://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def database(self) -> dict[str, Any]:
        """A ``settings.DATABASES`` entry for this server."""
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": DATABASE,
            "USER": USER,
            "HOST": "127.0.0.1",
            "PASSWORD": "",
            "PORT": str(self.port),
        }

    def connect(self) -> Any:
        """A psycopg connection of the test's own, in autocommit mode."""
        import psycopg

        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=USER, dbname=DATABASE, autocommit=True
        )

    def run(self, tool: str, *args: str) -> None:
        command = [str(self.folder / tool), *args]
        if self.prefix[-1:] == ["-c"]:  # su: one shell command line
            command = [shlex.join(command)]
        subprocess.run(
            [*self.prefix, *command], check=True, capture_output=True, timeout=START_TIMEOUT * 2
        )

    def create(self) -> None:
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8",
                 "--locale=C", "--no-sync")  # fmt: skip

    def start(self) -> None:
        """Start on a free port (another, if it was taken meanwhile); again on its port."""
        if self.port:
            self.ctl("start")
            return
        for attempt in range(3):
            self.port = free_port()
            with open(self.data / "postgresql.conf", "a") as conf:  # the last setting counts
                conf.write(
                    f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.directory}'\nfsync = off\n"
                    "synchronous_commit = off\nfull_page_writes = off\nshared_buffers = 16MB\n"
                )
            try:
                self.ctl("start")
                return
            except subprocess.CalledProcessError:
                if attempt == 2 or "could not bind" not in self.log_tail():
                    raise

    def restart(self) -> None:
        """A fast shutdown (every session is terminated), then a start; returns once it serves."""
        self.ctl("restart", "-m", "fast")

    def stop(self) -> None:
        self.ctl("stop", "-m", "immediate")

    def ctl(self, action: str, *args: str) -> None:
        self.run("pg_ctl", action, "-D", str(self.data), "-l", str(self.log), "-w",
                 "-t", str(START_TIMEOUT), *args)  # fmt: skip

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-10:])
        return ""


def _cannot(reason: str) -> NoReturn:
    pytest.skip(f"no private PostgreSQL server: {reason}")


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running private server (or the test skipped or failed, see the module); stopped and its
    folder removed afterwards."""
    folder = binaries()
    if folder is None:
        _cannot(f"initdb and pg_ctl are not installed (looked in {DEBIAN_BINARIES} and PATH)")
    how = runner()
    if isinstance(how, str):
        _cannot(how)
    prefix, owner = how
    directory = Path(tempfile.mkdtemp(prefix="isolatable-pg-"))
    server = PrivatePostgres(folder, directory, prefix)
    try:
        if owner is not None:
            os.chown(directory, *owner)
        began = time.monotonic()
        try:
            server.create()
            server.start()
        except (OSError, subprocess.SubprocessError) as e:
            output = (getattr(e, "stderr", b"") or b"").decode(errors="replace")
            reason = f"PostgreSQL of {folder} did not start: {e}\n{output}{server.log_tail()}"
            if os.environ.get("ISOLATABLE_REQUIRE_SERVICES") == "1":
                pytest.fail(f"{reason}\nand ISOLATABLE_REQUIRE_SERVICES=1 requires it")
            _cannot(reason)
        server.startup_seconds = time.monotonic() - began
        yield server
    finally:
        if (server.data / "postmaster.pid").exists():  # started, or half
            with contextlib.suppress(subprocess.SubprocessError):
                server.stop()
        shutil.rmtree(directory, ignore_errors=True)
