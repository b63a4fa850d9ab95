"""The stats page in a real headless browser (Debian chromium driven by chromedriver).

The page loads, shows every backend, and a backend killed during the test turns
to "down" on its own (the page refreshes itself).  The screenshot it takes is
the one in docs/operations.md (copied there when FASTLB_UPDATE_SCREENSHOT=1).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from conftest import ROOT, free_port, http_get, status_of

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    # .ci/run installs both; without them this test cannot run at all.
    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), \
        "install Debian's chromium and chromium-driver (.ci/run does)"
    profile = tempfile.mkdtemp(prefix="fastlb-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,330",
                 "--user-data-dir=" + profile):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def row_states(driver) -> dict:
    """Backend name -> state cell, read in one step so a self-refresh cannot tear it."""
    return driver.execute_script(
        "const s = {};"
        "for (const row of document.querySelectorAll('#backends tbody tr')) {"
        "  const cells = row.querySelectorAll('td');"
        "  if (cells.length && cells[0].textContent !== 'total')"
        "    s[cells[0].textContent] = cells[1].textContent;"
        "}"
        "return s;")


def test_stats_page_shows_every_backend_and_a_killed_one_turns_down(procs, browser, tmp_path):
    backends = []
    for name in ("alpha", "beta", "gamma"):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "index.html").write_text(name)
        backends.append(procs.backend(directory, name=name))
    admin = free_port()
    lb = procs.fastlb(*[b.port for b in backends], "--admin", admin, "--interval", "0.5")
    for _ in range(30):
        assert status_of(http_get(lb.port, "/index.html")) == 200

    browser.get("http://127.0.0.1:%d/" % admin)
    names = ["127.0.0.1:%d" % b.port for b in backends]
    assert "fastlb on" in browser.title
    assert row_states(browser) == {name: "up" for name in names}
    summary = browser.execute_script("return document.getElementById('summary').textContent")
    assert "connections accepted" in summary

    backends[1].stop()  # SIGKILL, then reaped
    WebDriverWait(browser, 15, poll_frequency=0.25).until(
        lambda d: row_states(d).get(names[1]) == "down")
    states = row_states(browser)
    assert states == {names[0]: "up", names[1]: "down", names[2]: "up"}
    reason = browser.execute_script(
        "return document.querySelector('#backends tbody tr.down td.reason').textContent")
    assert "refused" in reason

    shot = tmp_path / "stats-page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 5000
    if os.environ.get("FASTLB_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, ROOT / "docs" / "stats-page.png")
