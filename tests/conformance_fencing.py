"""Fencing tokens in the conformance suite: ``LockConformance`` inherits ``FencingConformance``,
so every strategy runs these (with its ``make`` and ``name`` fixtures)."""

from __future__ import annotations

import pytest
from django.db import connections, transaction

from django_isolatable import IsolationError, LockLost, fence
from django_isolatable.backends.base import Fencing, Semaphore

SUCCESSIVE_HOLDERS = 1000


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
