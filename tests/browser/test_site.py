"""The run report and the website (make site, tools/site.py), from a quick run of notebook 00, in headless Chromium.

Every page loads with no console error and no missing file, every figure loads, every link between pages (and to a
section of a page) resolves, and each notebook's page says which machine its numbers came from.
"""

import functools
import http.server
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from chromium import CHROMIUM, FLAGS, playwright_or_skip

from labkit import report, results

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[2]


def serve(folder: Path):
    """``folder`` over HTTP on a free local port, as a static host serves it: (base URL, server to shut down)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/", server


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.hrefs.append(attrs["href"])


@functools.lru_cache(maxsize=None)  # a page is read once, however many links point into it
def parsed(page: Path) -> Links:
    links = Links()
    links.feed(page.read_text())
    return links


def pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)


def open_clean(browser, url: str):
    """A page at ``url`` and what went wrong while it loaded: console errors, page errors, answers of 400 and above."""
    page, problems = browser.new_page(), []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(url)
    page.wait_for_load_state("load")
    return page, problems


def check_links(site: Path) -> int:
    """Every link between pages, and to a section of a page, resolves; returns how many were followed."""
    checked = 0
    for path in pages(site):
        for href in parsed(path).hrefs:
            parts = urlsplit(href)
            if parts.scheme or href.startswith("mailto:"):
                continue  # the wider web: not reachable here, and not the site's to keep
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            assert target.exists(), f"{path.name} links to {href}, which is not in the site"
            if parts.fragment and target.suffix == ".html":
                assert parts.fragment in parsed(target).ids, f"{path.name} links to {href}: no such section"
            checked += 1
    return checked


def check_machines(site: Path, run: Path) -> None:
    """Each notebook's page says which machine its numbers came from."""
    machine = results.run_label({"00": results.read_results(run / "00_setup_and_probes.results.json")})
    text = (site / "00_setup_and_probes.html").read_text()
    assert "The outputs on this page come from one run of this notebook on" in text and machine in text
    assert "quick sizes" in text
    for page in sorted(site.glob("0[1-9]_*.html")):  # not in this run: shown without outputs, and saying so
        assert "did not include this notebook" in page.read_text(), page.name
    flash = (site / "01_flash_attention.html").read_text()
    for device, run_01 in results.reference_runs("01_flash_attention").items():  # read from reference/
        assert f"reference/{device}/" in flash and results.run_label({"01": run_01}) in flash
        assert flash.count("<img") >= len(run_01["figures"])


def test_a_quick_run_of_00_gives_a_report_and_a_website_that_render(tmp_path):
    """The main job end to end, offline, from this checkout: `labkit run --quick` on notebook 00, its report.html, then
    `tools/site.py` on the run folder, every page opened in Chromium. (One test: the run is made once.)"""
    playwright = playwright_or_skip()
    pytest.importorskip("myst_nb", reason="the site extra is not installed (make installs it)")
    run, site = tmp_path / "run", tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "labkit.cli", "run", "--quick", "--notebooks", "00", "--out", str(run),
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report.read_summary(run)  # raises, naming the problems, unless it follows the schema
    done = subprocess.run([sys.executable, "tools/site.py", str(run), "--out", str(site)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr  # sphinx runs with -W: a warning (a broken link) fails
    assert check_links(site) > 100  # the table of contents alone links every page and section
    check_machines(site, run)
    base, server = serve(site)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page, problems = open_clean(browser, (run / "report.html").as_uri())
        assert page.locator("h2", has_text="Kernel matrix").count() == 1
        assert page.locator("section#nb-00_setup_and_probes .status").inner_text() == "ok"
        assert problems == [], f"report.html: {problems}"
        for path in pages(site):
            page, problems = open_clean(browser, base + path.relative_to(site).as_posix())
            images = page.eval_on_selector_all("article img", "els => els.map(e => e.complete && e.naturalWidth > 0)")
            assert all(images), f"{path.name}: a figure did not load"
            assert problems == [], f"{path.name}: {problems}"
            page.close()
        browser.close()
    server.shutdown()
