"""The admin's "Locks" page through Django's test client, on the cache strategy: the rows of
``locks status``, pagination over one ``list()`` per view, the two actions behind their
confirmation page and the ``django_isolatable.release_lock`` permission, and the admin log."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils.html import escape

from django_isolatable.admin import LockAdmin
from django_isolatable.backends import Backend, backend_for
from django_isolatable.holders import LockInfo, new_record

URL = "/admin/django_isolatable/lockentry/"
HOST = socket.gethostname()


@pytest.fixture
def backend(settings: Any) -> Iterator[Backend]:
    """The cache strategy on the local-memory cache, in a fresh namespace: what the page reads
    (it judges each holder by its PID, as on any host's store)."""
    settings.ISOLATABLE = {"STRATEGY": "cache", "KEY_PREFIX": f"admin-{uuid.uuid4().hex}:"}
    backend = backend_for()
    yield backend
    for info in list(backend.list()):
        backend.force_release(info.name)


def hold(backend: Backend, name: str, *, dead: bool = False) -> LockInfo:
    """A holder of ``name``: this process, or (``dead``) a process that is gone (its PID now
    names a process that started at another time)."""
    record = new_record(name, backend.strategy, ttl=600)
    if dead:
        record = dataclasses.replace(
            record, process_started_at=datetime(2001, 1, 1, tzinfo=timezone.utc)
        )
    lease = backend.acquire(name, record)
    assert lease is not None
    return lease.info


def key(info: LockInfo) -> str:
    return json.dumps([info.name, info.token])


@pytest.fixture
def operator(django_user_model: Any, client: Any) -> Any:
    """A staff user with ``django_isolatable.release_lock``, logged in."""
    user = django_user_model.objects.create_user("operator", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="release_lock"))
    client.force_login(user)
    return user


@pytest.fixture
def watcher(django_user_model: Any, client: Any) -> Any:
    """A staff user without the permission, logged in."""
    user = django_user_model.objects.create_user("watcher", password="pw", is_staff=True)
    client.force_login(user)
    return user


@pytest.fixture
def lists(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of ``list()`` calls each backend the page made went through."""
    calls: list[int] = []
    made = LockAdmin.backend

    def counting(self: LockAdmin) -> Backend:
        backend = made(self)
        listing = backend.list
        calls.append(0)

        def counted() -> Any:
            calls[-1] += 1
            return listing()

        backend.list = counted  # type: ignore[method-assign]
        return backend

    monkeypatch.setattr(LockAdmin, "backend", counting)
    return calls


@pytest.mark.django_db
def test_the_permission_exists_without_a_table_or_migration():
    permission = Permission.objects.get(codename="release_lock")
    assert permission.content_type.app_label == "django_isolatable"
    assert permission.name == "Can release locks"
    assert reverse("admin:django_isolatable_lockentry_changelist") == URL


@pytest.mark.django_db
def test_the_page_shows_the_rows_of_locks_status(client, operator, backend):
    live = hold(backend, "import-orders")
    hold(backend, "dead-job", dead=True)
    index = client.get("/admin/")
    assert URL in index.content.decode()
    page = client.get(URL)
    assert page.status_code == 200
    text = page.content.decode()
    assert "2 holders (cache strategy)." in text
    for column in ("Name", "State", "PID", "Host", "Started (UTC)", "Age", "Label", "Mode"):
        assert f"<span>{column}</span>" in text
    assert '<td class="state-held">held</td>' in text
    assert '<td class="state-stale">stale</td>' in text
    assert f"<td>{os.getpid()}</td><td>{HOST}</td>" in text
    assert f'value="{escape(key(live))}"' in text
    assert '<option value="release_stale">Release stale locks</option>' in text


@pytest.mark.django_db
def test_a_staff_user_without_the_permission_sees_the_page_but_cannot_release(
    client, watcher, backend
):
    info = hold(backend, "import-orders", dead=True)
    page = client.get(URL)
    assert page.status_code == 200
    text = page.content.decode()
    assert "import-orders" in text
    assert "Release stale locks" not in text
    assert "_selected_action" not in text
    for post in ("", "yes"):
        refused = client.post(
            URL, {"action": "release_stale", "_selected_action": [key(info)], "post": post}
        )
        assert refused.status_code == 403
    assert [h.token for h in backend.inspect("import-orders")] == [info.token]
    assert not LogEntry.objects.exists()


@pytest.mark.django_db
def test_anonymous_users_are_sent_to_the_login_form(client, backend):
    response = client.get(URL)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


@pytest.mark.django_db
def test_the_page_paginates_over_one_listing_per_view(client, operator, backend, lists):
    for n in range(250):
        hold(backend, f"job-{n:03}")
    first = client.get(URL).content.decode()
    assert first.count('class="action-select"') == 100
    assert "250 holders" in first
    assert '<a href="?p=3">3</a>' in first
    last = client.get(URL, {"p": "3"}).content.decode()
    assert last.count('class="action-select"') == 50
    assert '<span class="this-page">3</span>' in last
    past = client.get(URL, {"p": "99"}).content.decode()  # past the end: the last page
    assert past.count('class="action-select"') == 50
    assert client.get(URL, {"p": "x"}).content.decode().count('class="action-select"') == 100
    assert lists == [1, 1, 1, 1]
    shown = {line for line in first.splitlines() if "job-" in line}
    assert not shown & {line for line in last.splitlines() if "job-" in line}


@pytest.mark.django_db
def test_release_stale_confirms_then_releases_only_dead_holders_and_logs_each(
    client, operator, backend
):
    live = hold(backend, "live-job")
    dead = hold(backend, "dead-job", dead=True)
    chosen = {"action": "release_stale", "_selected_action": [key(live), key(dead)]}
    confirm = client.post(URL, chosen)
    assert confirm.status_code == 200
    text = confirm.content.decode()
    assert "These locks will be released" in text
    assert "live-job (pid" in text  # kept, and why
    assert "its holder is alive" in text
    assert text.count('name="_selected_action"') == 1  # only the dead one goes on
    assert backend.inspect("dead-job") != []  # nothing released before the confirmation
    done = client.post(URL, {**chosen, "post": "yes"}, follow=True)
    assert done.status_code == 200
    assert backend.inspect("dead-job") == []
    assert [h.token for h in backend.inspect("live-job")] == [live.token]
    entry = LogEntry.objects.get()
    assert entry.user == operator
    assert entry.object_repr == "dead-job"
    assert entry.get_change_message() == (
        f"Released stale lock dead-job (pid {os.getpid()} on {HOST})."
    )
    messages = [str(m) for m in done.context["messages"]]
    assert f"Released stale lock dead-job (pid {os.getpid()} on {HOST})." in messages
    assert "Not releasing live-job: its holder is alive." in messages


@pytest.mark.django_db
def test_force_release_releases_a_live_holder_by_its_token(client, operator, backend):
    live = hold(backend, "live-job")
    chosen = {"action": "force_release", "_selected_action": [key(live)]}
    assert "a holder that still runs goes on without" in client.post(URL, chosen).content.decode()
    client.post(URL, {**chosen, "post": "yes"})
    assert backend.inspect("live-job") == []
    assert LogEntry.objects.get().get_change_message() == (
        f"Force-released lock live-job (pid {os.getpid()} on {HOST})."
    )


@pytest.mark.django_db
def test_a_holder_that_took_the_lock_after_the_confirmation_page_is_left_alone(
    client, operator, backend
):
    first = hold(backend, "job")
    chosen = {"action": "force_release", "_selected_action": [key(first)]}
    client.post(URL, chosen)
    backend.force_release("job")
    second = hold(backend, "job")
    done = client.post(URL, {**chosen, "post": "yes"}, follow=True)
    assert [h.token for h in backend.inspect("job")] == [second.token]
    assert "job: that holder is gone already." in [str(m) for m in done.context["messages"]]
    assert not LogEntry.objects.exists()


@pytest.mark.django_db
def test_an_action_without_a_selection_says_so(client, operator, backend):
    done = client.post(URL, {"action": "release_stale"}, follow=True)
    assert "Choose the locks to release, then the action." in [
        str(m) for m in done.context["messages"]
    ]
