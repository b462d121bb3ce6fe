"""report.html opened in headless Chromium: the page renders, every figure loads, the console stays clean."""

from pathlib import Path

import pytest
from chromium import CHROMIUM, FLAGS, playwright_or_skip

from labkit import report

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    playwright = playwright_or_skip()
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


def test_report_renders_with_its_figures_and_no_console_errors(browser, make_run, tmp_path):
    make_run(tmp_path / "run", status="failed")
    page_path = report.write_report(tmp_path / "run", reference_folder=tmp_path / "none")
    page = browser.new_page()
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(Path(page_path).as_uri())
    assert page.title() == "Workbook run on Test CPU, 2 cores"
    images = page.eval_on_selector_all("img", "els => els.map(e => e.complete && e.naturalWidth > 0)")
    assert images == [True], "a figure did not load"
    assert page.locator("h2", has_text="01_flash_attention").count() == 1
    assert "RuntimeError: boom" in page.locator("pre.error").inner_text()
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert errors == []


# `labkit run --quick` end to end, with its report.html in Chromium: tests/browser/test_site.py (one run of 00 serves
# the report and the website).
