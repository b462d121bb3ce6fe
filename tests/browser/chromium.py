"""What the browser tests share: Debian's Chromium, started by Playwright on a machine with no network."""

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium keeps trying to reach Google.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def playwright_or_skip():
    """Playwright's sync API, or a skip saying what is missing."""
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (make installs it)")
    if not CHROMIUM:
        pytest.skip("no Chromium on this machine: `apt-get install chromium` (make test does it where it can)")
    return playwright
