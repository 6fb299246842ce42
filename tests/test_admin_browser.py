"""The admin's "Locks" page in a real browser: Debian's Chromium, headless, driven by Selenium
through ``chromedriver``, against pytest-django's ``live_server`` and locks held by real
processes on the file strategy.

Skipped when Chromium, its driver or Selenium is missing (a failure under
ISOLATABLE_REQUIRE_SERVICES=1, as in CI, whose ``.ci/run`` installs them). With
ISOLATABLE_SCREENSHOT=PATH, the page with its held and stale locks is saved there as a PNG
(docs/images/admin-locks.png is made so).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission

from tests.processes import Worker

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PASSWORD = "a-long-test-password"
URL = "/admin/django_isolatable/lockentry/"


def require_browser() -> None:
    """Skip unless Chromium, chromedriver and Selenium are here; fail instead under
    ISOLATABLE_REQUIRE_SERVICES=1."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if not missing:
        return
    reason = f"{' and '.join(missing)} missing (apt-get install chromium chromium-driver)"
    if os.environ.get("ISOLATABLE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and ISOLATABLE_REQUIRE_SERVICES=1 requires it")
    pytest.skip(f"{reason} (set ISOLATABLE_REQUIRE_SERVICES=1 to fail instead)")


@pytest.fixture
def browser() -> Iterator[Any]:
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument("--window-size=1440,700")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


@pytest.fixture
def holders(tmp_path: Path, lock_dir: Path) -> Iterator[Callable[..., Worker]]:
    """Starts ``python -m tests.workers hold NAME LOCK_DIR`` processes; kills them after."""
    started: list[Worker] = []

    def start(name: str, *options: str) -> Worker:
        stderr = tmp_path / f"holder-{len(started)}.stderr"
        worker = Worker(stderr, "hold", name, str(lock_dir), *options)
        started.append(worker)
        worker.expect("held")
        return worker

    yield start
    for worker in started:
        worker.close()


def log_in(browser: Any, live_server: Any, username: str) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(live_server.url + URL)
    assert "/admin/login/" in browser.current_url
    browser.find_element(By.ID, "id_username").send_keys(username)
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    assert browser.find_element(By.ID, "lock-summary")  # sent on to the page


def absent(browser: Any, by: str, value: str) -> bool:
    """No such element on the page as loaded (not waited for, as found ones are)."""
    browser.implicitly_wait(0)
    try:
        return not browser.find_elements(by, value)
    finally:
        browser.implicitly_wait(5)


def row_state(browser: Any, name: str) -> str:
    from selenium.webdriver.common.by import By

    return str(
        browser.find_element(By.XPATH, f"//td[text()='{name}']/following-sibling::td[1]").text
    )


def test_operators_see_locks_go_stale_and_release_them_and_others_cannot(
    browser, live_server, holders, django_user_model, settings
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    settings.ISOLATABLE = {**settings.ISOLATABLE, "STRATEGY": "file"}
    operator = django_user_model.objects.create_user("operator", password=PASSWORD, is_staff=True)
    operator.user_permissions.add(Permission.objects.get(codename="release_lock"))
    django_user_model.objects.create_user("watcher", password=PASSWORD, is_staff=True)
    holders("import-orders")
    holders("thumbnails", "--max-holders", "2")
    newsletter = holders("send-newsletter")

    log_in(browser, live_server, "operator")
    assert row_state(browser, "send-newsletter") == "held"
    assert row_state(browser, "import-orders") == "held"
    newsletter.kill()  # the kernel frees its flock: stale at once, its record left behind
    browser.refresh()
    assert row_state(browser, "send-newsletter") == "stale"
    assert row_state(browser, "import-orders") == "held"
    if screenshot := os.environ.get("ISOLATABLE_SCREENSHOT"):
        browser.save_screenshot(screenshot)

    browser.find_element(
        By.XPATH, "//tr[td[text()='send-newsletter']]//input[@name='_selected_action']"
    ).click()
    Select(browser.find_element(By.NAME, "action")).select_by_visible_text("Release stale locks")
    browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()
    confirmation = browser.find_element(By.ID, "release_list").text
    assert "send-newsletter" in confirmation
    assert str(newsletter.pid) in confirmation
    assert "import-orders" not in confirmation
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    message = browser.find_element(By.CSS_SELECTOR, "ul.messagelist li.success").text
    assert message.startswith(f"Released stale lock send-newsletter (pid {newsletter.pid} on ")
    assert absent(browser, By.XPATH, "//td[text()='send-newsletter']")
    assert row_state(browser, "import-orders") == "held"
    entry = LogEntry.objects.get()
    assert (entry.user, entry.object_repr) == (operator, "send-newsletter")

    log_in(browser, live_server, "watcher")  # staff, without release_lock
    assert row_state(browser, "import-orders") == "held"
    assert absent(browser, By.NAME, "action")
    assert absent(browser, By.NAME, "_selected_action")
    # Posted anyway, as a crafted form would: refused.
    browser.execute_script(
        """const form = document.getElementById('changelist-form');
        for (const [name, value] of [['action', 'force_release'],
                                     ['_selected_action', '["import-orders", null]'],
                                     ['post', 'yes']]) {
            const input = document.createElement('input');
            input.type = 'hidden'; input.name = name; input.value = value;
            form.appendChild(input);
        }
        form.submit();"""
    )
    deadline = time.monotonic() + 10
    while "403" not in browser.title and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "403" in browser.find_element(By.TAG_NAME, "body").text
    assert LogEntry.objects.count() == 1


def test_the_browser_requirement_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.delenv("ISOLATABLE_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="/usr/bin/chromium and /usr/bin/chromedriver"):
        require_browser()
    monkeypatch.setenv("ISOLATABLE_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="ISOLATABLE_REQUIRE_SERVICES=1 requires it"):
        require_browser()
