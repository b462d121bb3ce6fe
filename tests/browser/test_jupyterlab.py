"""The learner's view: JupyterLab in headless Chromium runs each notebook (quick sizes) as a learner would, and the
widgets work: tables render as HTML, the live timing board fills in while the sweep runs, a picker changes what the
next cell measures, figures appear as images. `make test-browser` runs it (CI too); `make screenshots` keeps the
screenshots for the README.

The kernels run as a learner's who installed the core packages only: the optional ones (bitsandbytes, torchao, the
serving packages: kernel_guard.OPTIONAL) are hidden, so the cells of 04, 05 and 06 that need them must skip, each with
its reason, and every check must still pass. make test runs the same notebooks with those packages; the fault matrix
leaves this condition to this test (tests/faults/conditions.py, ELSEWHERE). `make screenshots` leaves them importable.

A failure names the notebook and the widget. The server runs from this venv on a loopback port with a random token,
on a copy of the notebooks (so nothing in the checkout is changed), with the kernels' deprecation canary and network
block (tests/kernel_guard.py).
"""

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import kernel_guard
import nbformat
import pytest
from chromium import CHROMIUM, FLAGS, playwright_or_skip

from labkit import launcher
from labkit.results import read_results

pytestmark = [pytest.mark.browser, pytest.mark.jupyterlab]
ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
RUN_LIMIT_S = 300
# Runs in the page: every change to the DOM is scanned for the live board's status line ("3/24 rows, measuring").
WATCH_BOARD = """() => {
  window.labkitBoard = [];
  new MutationObserver(() => {
    for (const el of document.querySelectorAll('.widget-html')) {
      const found = /(\\d+)\\/(\\d+) rows, measuring/.exec(el.textContent);
      if (found) window.labkitBoard.push([Number(found[1]), Number(found[2])]);
    }
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook on show
# The screenshots (make screenshots) show every package's cells (06's server under load); the tests hide the optional ones.
HIDDEN = not os.environ.get("LABKIT_SCREENSHOTS")
# What a skip reason must name where the optional packages are hidden (bitsandbytes, torchao, the serving packages).
SKIPS_MENTION = {"04_quantization": ("bitsandbytes", "torchao"), "05_multi_gpu": ("bitsandbytes",),
                 "06_serving": ("transformers[serving]",)}


class Lab:
    def __init__(self, folder: Path, port: int, token: str, browser, shots: Path):
        self.folder, self.port, self.token, self.browser, self.shots = folder, port, token, browser, shots

    def api(self, path: str):
        joiner = "&" if "?" in path else "?"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}{joiner}token={self.token}", timeout=10) as answer:
            return json.loads(answer.read())

    def kernel_state(self, notebook: str) -> str:
        sessions = [s for s in self.api("/api/sessions") if s["path"].endswith(notebook)]
        return self.api(f"/api/kernels/{sessions[0]['kernel']['id']}")["execution_state"] if sessions else "none"

    def open(self, notebook: str):
        page = self.browser.new_page(viewport={"width": 1400, "height": 1000})
        # ?reset: a fresh workspace, so the notebook of the previous test is not open beside this one
        page.goto(f"http://127.0.0.1:{self.port}/lab/tree/{notebook}?reset&token={self.token}")
        page.wait_for_selector(f"{PANEL} .jp-Cell", timeout=60_000)
        deadline = time.time() + 60
        while self.kernel_state(notebook) not in ("idle", "busy") and time.time() < deadline:
            time.sleep(0.5)
        return page

    def run_all(self, page, notebook: str):
        """Run > Run All Cells, then wait until the kernel stays idle."""
        page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        self.wait_idle(page, notebook)

    def wait_idle(self, page, notebook: str):
        deadline, idle_since = time.time() + RUN_LIMIT_S, None
        time.sleep(1)
        while time.time() < deadline:
            state = self.kernel_state(notebook)
            pending = page.locator(".jp-InputPrompt", has_text="[*]").count()
            if state == "idle" and not pending:
                idle_since = idle_since or time.time()
                if time.time() - idle_since > 1.5:
                    return
            else:
                idle_since = None
            time.sleep(0.25)
        pytest.fail(f"{notebook}: still running after {RUN_LIMIT_S} s in JupyterLab")

    def save_and_read(self, page, notebook: str):
        """Ctrl+S in the page, then the file as the server wrote it (waits for the save to land)."""
        before = self.api(f"/api/contents/{notebook}?content=0")["last_modified"]
        page.locator(PANEL).first.click(position={"x": 5, "y": 5})
        page.keyboard.press("Control+s")
        deadline = time.time() + 30
        while self.api(f"/api/contents/{notebook}?content=0")["last_modified"] == before:
            if time.time() > deadline:
                pytest.fail(f"{notebook}: JupyterLab did not save the notebook within 30 s")
            time.sleep(0.2)
        # The server's "atomic" save truncates the file and writes it in place, keeping the old one as .~<name>
        # until the write is done (jupyter_server.services.contents.fileio.atomic_writing): last_modified changes
        # when the write starts, so read only once that backup is gone and the file parses.
        backup = self.folder / f".~{notebook}"
        while True:
            try:
                if not backup.exists():
                    return nbformat.read(self.folder / notebook, as_version=4)
            except nbformat.reader.NotJSONError:
                pass
            if time.time() > deadline:
                pytest.fail(f"{notebook}: the saved notebook was still being written after 30 s")
            time.sleep(0.2)

    def shut_down(self, notebook: str):
        """Stop the notebook's kernel, so that the next notebook has the machine to itself."""
        for session in self.api("/api/sessions"):
            if session["path"].endswith(notebook):
                request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/sessions/{session['id']}"
                                                 f"?token={self.token}", method="DELETE")
                urllib.request.urlopen(request, timeout=30)

    def shot(self, locator, name: str):
        self.shots.mkdir(parents=True, exist_ok=True)
        locator.scroll_into_view_if_needed()
        locator.screenshot(path=str(self.shots / f"{name}.png"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    playwright = playwright_or_skip()
    if importlib.util.find_spec("jupyterlab") is None:
        pytest.skip("JupyterLab is not installed in this venv (make install does it)")
    work = tmp_path_factory.mktemp("jupyterlab")
    folder = work / "notebooks"
    shutil.copytree(ROOT / "notebooks", folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "legacy"))
    for name in NOTEBOOKS:  # quick sizes, as a learner on a laptop would set them in the parameters cell
        nb = nbformat.read(folder / name, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        cell.source = re.sub(r"^quick = \S+", "quick = True", cell.source, flags=re.M)
        cell.source = re.sub(r'^results_path = ""', f'results_path = "{name[:2]}.results.json"', cell.source, flags=re.M)
        assert f"{name[:2]}.results.json" in cell.source, f"{name}: its parameters cell has no results_path = \"\""
        nbformat.write(nb, folder / name)
    settings = work / "settings" / "@jupyterlab"
    (settings / "notebook-extension").mkdir(parents=True)
    # every cell in the page (JupyterLab 4 leaves cells out of the page while they are scrolled away)
    (settings / "notebook-extension" / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    (settings / "apputils-extension").mkdir(parents=True)
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = launcher.free_port(), secrets.token_hex(16)
    profile = kernel_guard.make_profile(work / "ipython")  # no network, deprecations are errors
    if HIDDEN:  # the module docstring says why
        kernel_guard.hide_packages(profile, kernel_guard.OPTIONAL)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IPYTHONDIR": profile,
           "JUPYTERLAB_SETTINGS_DIR": str(work / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(work / "workspaces"),
           "JUPYTER_CONFIG_DIR": str(work / "config"), "JUPYTER_RUNTIME_DIR": str(work / "runtime")}
    log = (work / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
                               f"--port={port}", f"--ServerApp.token={token}", f"--ServerApp.root_dir={folder}"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            if server.poll() is not None or time.time() > deadline:
                pytest.fail("JupyterLab did not start: " + (work / "server.log").read_text()[-1500:])
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        shots = Path(os.environ.get("LABKIT_SCREENSHOTS") or work / "screenshots")
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            yield Lab(folder, port, token, browser, shots)
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def errors_in(nb) -> list[str]:
    found = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(f"{output.get('ename')}: {output.get('evalue')}")
    unrun = sum(1 for c in nb.cells if c.cell_type == "code" and c.get("execution_count") is None)
    return found + ([f"{unrun} code cells did not run"] if unrun else [])


def output_of(page, text: str):
    """The output area of the code cell whose source contains ``text``."""
    cell = page.locator(f"{PANEL} .jp-CodeCell", has=page.locator(".jp-InputArea", has_text=text)).first
    return cell, cell.locator(".jp-OutputArea")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n[:2] for n in NOTEBOOKS])
def test_notebook_runs_in_jupyterlab_and_its_widgets_work(lab, notebook):
    page = lab.open(notebook)
    stem = notebook.removesuffix(".ipynb")
    if stem == "01_flash_attention":  # record every "n/total rows, measuring" the live board shows, as it happens
        page.evaluate(WATCH_BOARD)
    lab.run_all(page, notebook)
    problems = errors_in(lab.save_and_read(page, notebook))
    assert not problems, f"{stem}: {problems}"
    data = read_results(lab.folder / f"{stem[:2]}.results.json")
    failed = [name for name, passed in data["checks"].items() if not passed]
    assert data["checks"] and not failed, f"{stem}: checks failed without the optional packages: {failed}"
    for mention in SKIPS_MENTION.get(stem, ()) if HIDDEN else ():
        assert any(mention in why for why in data["skipped"].values()), \
            f"{stem}: no skip reason mentions {mention!r}: {data['skipped']}"
    panel = page.locator(PANEL)
    figures = panel.locator(".jp-OutputArea-output img")

    if stem == "00_setup_and_probes":
        table = panel.locator(".jp-OutputArea-output table", has=page.locator("caption", has_text="Did the forced backend run on"))
        assert table.count() == 1, f"{stem}: the probe table did not render as an HTML table"
        assert table.locator("tbody tr").count() >= 3, f"{stem}: the probe table has no rows"
        lab.shot(table, "00_probe_table")

    if stem == "01_flash_attention":
        board = panel.locator(".jupyter-widgets.widget-vbox", has_text="SDPA forward sweep")
        assert board.count() == 1, f"{stem}: the live timing board did not render as a widget"
        filling = sorted({n for n, total in page.evaluate("window.labkitBoard") if 0 < n < total})
        assert len(filling) >= 2, f"{stem}: the live timing board did not fill in while the sweep ran (counts seen: {filling})"
        assert "rows, done" in board.inner_text(), f"{stem}: the live timing board never said done"
        assert board.locator("tbody tr").count() >= 4, f"{stem}: the live timing board shows no rows"
        lab.shot(board, "01_live_board")
        assert figures.count() >= 2, f"{stem}: the sweep figures did not appear as images"
        lab.shot(figures.first, "01_sweep_figure")
        # the pickers: another backend and another length, then the next cell measures exactly that
        backend = panel.locator(".widget-dropdown", has_text="backend").locator("select")
        length = panel.locator(".widget-dropdown", has_text="sequence length").locator("select")
        assert backend.count() == 1 and length.count() == 1, f"{stem}: the backend and length pickers did not render"
        backends = backend.locator("option").all_inner_texts()
        lengths = length.locator("option").all_inner_texts()
        new_backend = next(b for b in ["MATH", *backends] if b != backend.input_value())
        new_length = lengths[-1] if length.input_value() != lengths[-1] else lengths[0]
        backend.select_option(label=new_backend)
        length.select_option(label=new_length)
        cell, output = output_of(page, "picked_backend, picked_n = backend_picker.value")
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        lab.wait_idle(page, notebook)
        text = output.inner_text()
        assert f"the profiler saw {new_backend}" in text and new_backend in text, \
            f"{stem}: the backend picker did not change what the next cell measured: {text[:300]}"
        assert re.search(rf"\b{new_length}\b", text), \
            f"{stem}: the length picker did not change what the next cell measured: {text[:300]}"
        lab.shot(cell, "01_picker")

    if stem in ("02_decoders_and_generation", "03_encoder_fastpath", "04_quantization", "05_multi_gpu", "06_serving",
                "07_serving_internals"):
        assert figures.count() >= 1, f"{stem}: its figures did not appear as images"
        assert page.evaluate("els => els.every(e => e.complete && e.naturalWidth > 0)",
                             figures.element_handles()), f"{stem}: a figure did not load"
        lab.shot(figures.last, f"{stem[:2]}_figure")
    lab.shut_down(notebook)
    page.close()
