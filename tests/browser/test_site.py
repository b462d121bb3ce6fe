"""The website (make site, tools/site.py): built offline from a quick run of notebook 00, read in headless Chromium.

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

from labkit import results

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(site folder, run folder): `labkit run --quick` of notebook 00, then the site built from it."""
    pytest.importorskip("myst_nb", reason="the site extra is not installed (make installs it)")
    folder = tmp_path_factory.mktemp("site")
    run, site = folder / "run", folder / "site"
    done = subprocess.run([sys.executable, "-m", "labkit.cli", "run", "--quick", "--notebooks", "00", "--out", str(run),
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([sys.executable, "tools/site.py", str(run), "--out", str(site)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr  # sphinx runs with -W: a warning (a broken link) fails
    return site, run


@pytest.fixture(scope="module")
def served(built):
    """The site over HTTP on a free local port, as a static host serves it."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(built[0]))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


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


def parsed(page: Path) -> Links:
    links = Links()
    links.feed(page.read_text())
    return links


def pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)


def test_every_page_loads_with_its_figures_and_no_console_errors(built, served):
    playwright = playwright_or_skip()
    site = built[0]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        for path in pages(site):
            page, problems = browser.new_page(), []
            page.on("console", lambda m, problems=problems: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e, problems=problems: problems.append(str(e)))
            page.on("response", lambda r, problems=problems: problems.append(f"{r.status} {r.url}")
                    if r.status >= 400 else None)
            page.goto(served + path.relative_to(site).as_posix())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all("article img", "els => els.map(e => e.complete && e.naturalWidth > 0)")
            assert all(images), f"{path.name}: a figure did not load"
            assert problems == [], f"{path.name}: {problems}"
            page.close()
        browser.close()


def test_links_between_pages_and_to_their_sections_resolve(built):
    site = built[0]
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
    assert checked > 100  # the table of contents alone links every page and section


def test_each_notebook_page_says_which_machine_its_numbers_came_from(built):
    site, run = built
    machine = results.run_label({"00": results.read_results(run / "00_setup_and_probes.results.json")})
    text = (site / "00_setup_and_probes.html").read_text()
    assert "The outputs on this page come from one run of this notebook on" in text and machine in text
    assert "quick sizes" in text
    for page in sorted(site.glob("0[1-6]_*.html")):  # not in this run: shown without outputs, and saying so
        assert "did not include this notebook" in page.read_text(), page.name
    stored = results.reference_runs("01_flash_attention")
    flash = (site / "01_flash_attention.html").read_text()
    for device, run_01 in stored.items():  # the stored GPU runs, read from reference/: their device and figures
        assert f"reference/{device}/" in flash and results.run_label({"01": run_01}) in flash
        assert flash.count("<img") >= len(run_01["figures"])
