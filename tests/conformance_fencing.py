"""Fencing tokens in the conformance suite: ``LockConformance`` inherits ``FencingConformance``,
so every strategy runs these (with its ``make`` and ``name`` fixtures)."""

from __future__ import annotations

import io
import json
import re

import pytest
from django.core.management import call_command
from django.db import connections, transaction

from django_isolatable import IsolationError, LockLost, fence
from django_isolatable.backends.base import Fencing, Semaphore, Shared

SUCCESSIVE_HOLDERS = 1000


def _status_tokens(strategy: str, name: str) -> list[object]:
    """The ``fencing_token`` of each row of ``locks status NAME --json``."""
    stdout = io.StringIO()
    call_command("locks", "--strategy", strategy, "status", name, "--json", stdout=stdout)
    return [row["fencing_token"] for row in json.loads(stdout.getvalue())]


class FencingConformance:
    strategy: str

    def test_the_backend_issues_fencing_tokens(self, make, name):
        assert isinstance(make(name).backend, Fencing)

    def test_tokens_increase_across_successive_holders(self, make, name):
        isolation = make(name)
        last = 0
        for _ in range(SUCCESSIVE_HOLDERS):
            with isolation.try_lock() as guard:
                token = guard.fencing_token
                assert token > last
                assert guard.fencing_token == token  # issued once per guard
                last = token

    def test_every_holder_of_a_semaphore_gets_its_own_greater_token(self, make, name):
        isolation = make(name, max_holders=3)
        if not isinstance(isolation.backend, Semaphore):
            pytest.skip(f"the {self.strategy} strategy has no semaphores")
        guards = [isolation.try_lock() for _ in range(3)]
        tokens = [guard.fencing_token for guard in guards]
        assert tokens == sorted(set(tokens))
        for guard in guards:
            guard.release()
        with isolation.try_lock() as later:
            assert later.fencing_token > tokens[-1]

    def test_a_guard_released_before_its_token_was_read_has_none(self, make, name):
        guard = make(name).try_lock()
        guard.release()
        with pytest.raises(IsolationError, match="released before its fencing token was read"):
            _ = guard.fencing_token

    def test_a_holder_whose_lock_was_taken_gets_no_token_and_is_lost(self, make, name):
        stale = make(name).try_lock()
        assert make(name).release_all()  # as `locks release --force` does
        with make(name).try_lock() as successor:
            newer = successor.fencing_token
            with pytest.raises(LockLost):
                _ = stale.fencing_token
            assert stale.lost
            assert successor.fencing_token == newer
        stale.release()

    def test_fence_refuses_an_older_holders_writes(self, make, name):
        first = make(name).try_lock()
        token = first.fencing_token
        first.release()
        with make(name).try_lock() as second:
            with transaction.atomic(using="sqlite"):
                fence(second, using="sqlite")
            assert second.fencing_token > token
        with pytest.raises(LockLost) as raised, transaction.atomic(using="sqlite"):
            fence(first, using="sqlite")
        assert raised.value.newer_fencing_token == second.fencing_token
        assert first.lost
        assert not connections["sqlite"].in_atomic_block

    def test_locks_status_shows_the_token_the_holder_was_issued(self, make, name):
        isolation = make(name)
        with isolation.try_lock() as guard:
            assert _status_tokens(self.strategy, name) == [None]
            assert guard.info.fencing_token is None
            token = guard.fencing_token
            assert _status_tokens(self.strategy, name) == [token]
            assert guard.info.fencing_token == token
            (holder,) = isolation.backend.inspect(name)
            assert (holder.token, holder.fencing_token) == (guard.info.token, token)
        with isolation.try_lock():  # the next holder has none until it reads one
            assert _status_tokens(self.strategy, name) == [None]

    def test_locks_status_has_a_fencing_column_at_verbosity_2(self, make, name):
        def table() -> str:
            stdout = io.StringIO()
            args = ("--strategy", self.strategy, "status", name, "-v", "2")
            call_command("locks", *args, stdout=stdout)
            return stdout.getvalue()

        with make(name).try_lock() as guard:
            assert "FENCING" not in table()
            token = guard.fencing_token
            shown = table()
            assert re.search(r"\bTOKEN +FENCING +COMMAND\b", shown)
            assert re.search(rf"\b{guard.info.token} +{token} ", shown)

    def test_locks_status_shows_each_semaphore_holder_its_own_token(self, make, name):
        isolation = make(name, max_holders=3)
        if not isinstance(isolation.backend, Semaphore):
            pytest.skip(f"the {self.strategy} strategy has no semaphores")
        self._each_holder_its_own_token(isolation, [isolation.try_lock() for _ in range(3)])

    def test_locks_status_shows_each_shared_holder_its_own_token(self, make, name):
        isolation = make(name)
        if not isinstance(isolation.backend, Shared):
            pytest.skip(f"the {self.strategy} strategy has no shared locks")
        self._each_holder_its_own_token(isolation, [isolation.lock(0, shared=True) for _ in "ab"])

    def _each_holder_its_own_token(self, isolation, guards):
        name = isolation.name
        try:
            assert _status_tokens(self.strategy, name) == [None] * len(guards)
            first = guards[0].fencing_token
            shown = _status_tokens(self.strategy, name)
            assert sorted(shown, key=lambda token: token or 0) == [None] * (len(guards) - 1) + [
                first
            ]
            issued = {guard.info.token: guard.fencing_token for guard in guards}
            assert sorted(_status_tokens(self.strategy, name)) == sorted(issued.values())
            assert {h.token: h.fencing_token for h in isolation.backend.inspect(name)} == issued
            assert all(guard.info.fencing_token == issued[guard.info.token] for guard in guards)
        finally:
            for guard in guards:
                guard.release()
