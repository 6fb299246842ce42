"""The admin's "Locks" page: the rows of ``manage.py locks status``, and two actions.

Loaded by ``django.contrib.admin``'s autodiscovery, so only where the admin is installed. Any
staff user sees the page; releasing takes the permission ``django_isolatable.release_lock``.
Each view reads the store through one ``list()``, streamed: a page keeps only its own rows.
A release goes by the token of the holder chosen, judged again at that moment (as ``locks
release`` does), and is written to the admin log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.core.paginator import Page, Paginator
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path

from django_isolatable.backends import Backend, backend_for
from django_isolatable.errors import IsolationError
from django_isolatable.holders import LockInfo, judged, printable
from django_isolatable.isolation import release_stale
from django_isolatable.management.commands.locks import _label, _mode, _row, _who, state_of
from django_isolatable.models import LockEntry

logger = logging.getLogger(__name__)

PERMISSION = "django_isolatable.release_lock"
#: The actions, by the value the page's form posts.
ACTIONS = {"release_stale": "Release stale locks", "force_release": "Force release"}
COLUMNS = ("Name", "State", "PID", "Host", "Started (UTC)", "Age", "Label", "Mode", "Command")


class StoreWindow:
    """The holders of one ``list()``, counted, of which only one page is kept: what Django's
    ``Paginator`` slices. The page asked for, or the last one when it asks past the end."""

    def __init__(self, holders: Iterable[LockInfo], page: int, per_page: int) -> None:
        wanted, self.start, self.total = (page - 1) * per_page, 0, 0
        kept: list[LockInfo] = []
        for info in holders:
            if self.total % per_page == 0 and self.total <= wanted:
                kept, self.start = [], self.total  # the page asked for, or the last one so far
            if self.total < self.start + per_page:
                kept.append(info)
            self.total += 1
        self.rows = [judged(info) for info in kept]

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, window: slice) -> list[LockInfo]:
        assert window.start == self.start, "only the page read can be shown"
        return self.rows


def key_of(info: LockInfo) -> str:
    """What a row's checkbox posts: the holder's name and token."""
    return json.dumps([info.name, info.token])


def cells(info: LockInfo) -> list[str]:
    """The row ``locks status`` shows, in COLUMNS' order."""
    *row, command = _row(info.name, info)
    return [*row, _label(info), _mode(info), command]


@admin.register(LockEntry)
class LockAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    per_page = 100

    def has_module_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.is_active and request.user.is_staff)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_module_permission(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        name = f"{self.opts.app_label}_{self.opts.model_name}_changelist"
        return [path("", self.admin_site.admin_view(self.locks_view), name=name)]

    def backend(self) -> Backend:
        return backend_for()

    def locks_view(self, request: HttpRequest) -> HttpResponse:
        """The page (GET), or an action's confirmation page and then its releases (POST)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            return self.action_view(request)
        context = self.context(request, "Locks")
        can_release = request.user.has_perm(PERMISSION)
        try:
            backend = self.backend()
            number = _page_number(request.GET.get("p"))
            window = StoreWindow(backend.list(), number, self.per_page)
        except (IsolationError, ImproperlyConfigured, NotImplementedError) as e:
            context["error"] = printable(str(e) or type(e).__name__)
            return TemplateResponse(request, "admin/django_isolatable/locks.html", context)
        paginator: Paginator[LockInfo] = Paginator(window, self.per_page)  # type: ignore[arg-type]
        page: Page[LockInfo] = paginator.page(window.start // self.per_page + 1)
        context.update(
            strategy=backend.strategy,
            page=page,
            pages=paginator.get_elided_page_range(page.number) if paginator.num_pages > 1 else [],
            columns=COLUMNS,
            rows=[(key_of(info), state_of(info), cells(info)) for info in page.object_list],
            actions=ACTIONS if can_release else {},
        )
        return TemplateResponse(request, "admin/django_isolatable/locks.html", context)

    def action_view(self, request: HttpRequest) -> HttpResponse:
        if not request.user.has_perm(PERMISSION):
            raise PermissionDenied
        action = request.POST.get("action", "")
        keys = request.POST.getlist("_selected_action")
        if action not in ACTIONS:
            self.message_user(request, "No action chosen.", messages.WARNING)
            return HttpResponseRedirect(request.get_full_path())
        if not keys:
            self.message_user(
                request, "Choose the locks to release, then the action.", messages.WARNING
            )
            return HttpResponseRedirect(request.get_full_path())
        backend = self.backend()
        chosen = [_holder(backend, key) for key in keys]
        if request.POST.get("post") == "yes":
            for key, holder in zip(keys, chosen, strict=True):
                self.release(request, backend, key, holder, force=action == "force_release")
            return HttpResponseRedirect(request.get_full_path())
        force = action == "force_release"
        context = self.context(request, f"{ACTIONS[action]}: are you sure?")
        context.update(
            action=action,
            action_title=ACTIONS[action],
            columns=COLUMNS,
            released=[
                (key, cells(h))
                for key, h in zip(keys, chosen, strict=True)
                if h is not None and _takes(h, force)
            ],
            kept=[
                (cells(h), _why_kept(h)) for h in chosen if h is not None and not _takes(h, force)
            ],
            gone=sum(h is None for h in chosen),
        )
        return TemplateResponse(request, "admin/django_isolatable/locks_confirm.html", context)

    def release(
        self, request: HttpRequest, backend: Backend, key: str, holder: LockInfo | None, force: bool
    ) -> None:
        """Release the holder chosen (judged just now), by its token; say what happened."""
        name = json.loads(key)[0]
        if holder is None:
            self.message_user(request, f"{printable(name)}: that holder is gone already.")
            return
        if not _takes(holder, force):
            self.message_user(
                request, f"Not releasing {printable(name)}: {_why_kept(holder)}.", messages.ERROR
            )
            return
        if holder.token is None:
            released = bool(release_stale(backend, name))
        else:
            released = backend.force_release(name, token=holder.token)
        if not released:
            self.message_user(
                request, f"{printable(name)} was not released: it is gone or taken.", messages.ERROR
            )
            return
        if holder.alive is False:
            message = f"Released stale lock {printable(name)} ({_who(holder)})."
            logger.info("Released the stale lock %s of %s from the admin", name, _who(holder))
        else:
            message = f"Force-released lock {printable(name)} ({_who(holder)})."
            logger.warning("Force-released lock %s (%s) from the admin", name, backend.strategy)
        self.log_change(request, LockEntry(name=name), message)
        self.message_user(request, message, messages.SUCCESS)

    def context(self, request: HttpRequest, title: str) -> dict[str, Any]:
        return {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.opts,
            "app_label": self.opts.app_label,
        }


def _page_number(value: str | None) -> int:
    try:
        return max(int(value or 1), 1)
    except ValueError:
        return 1


def _holder(backend: Backend, key: str) -> LockInfo | None:
    """The holder ``key`` names as the store has it now, judged; None if it is gone."""
    try:
        name, token = json.loads(key)
    except (ValueError, TypeError):
        return None
    if not isinstance(name, str) or not (token is None or isinstance(token, str)):
        return None
    found = [judged(info) for info in backend.inspect(name) if info.token == token]
    return found[0] if found else None


def _takes(holder: LockInfo | None, force: bool) -> bool:
    """Whether the action releases ``holder``: a stale one always, any with ``force``; one
    without a token only when stale (nothing else tells it from a newer holder)."""
    if holder is None:
        return False
    if holder.token is None:
        return holder.alive is False
    return force or holder.alive is False


def _why_kept(holder: LockInfo) -> str:
    if holder.token is None and holder.alive is not False:
        return "its record has no owner token, so it cannot be released safely"
    return "its holder is alive" if holder.alive else "its holder cannot be judged from this host"
