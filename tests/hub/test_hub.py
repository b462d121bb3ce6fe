"""The class hub on loopback (make test-hub): a real JupyterHub, its proxy, and three learner accounts.

Each learner signs in with their password through the hub's REST API, starts a server, and runs notebook 00 (quick)
and one exercise in a kernel of that server, as that learner's account. The kernel is driven through jupyter_server's
own API (a kernel, then its websocket): it is the path a learner's browser takes, and the code runs in the learner's
process, so a file the learner cannot read stays unread. `jupyter nbconvert` through a terminal would test a shell
instead. Then the teacher's `labkit progress --class` shows all three; learner 1 is refused learner 2's server and
files; a wrong password is refused; an open authenticator on a public address does not start. Everything is stopped
and the accounts are removed at the end, even on a failure.

Needs root and useradd (the hub starts each server as its learner's account), and `make hub`. It runs only in its own
target: `make test-hub` sets LABKIT_TEST_HUB=1.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HUB = ROOT / "hub"
VENV = Path(os.environ.get("LABKIT_HUB_VENV") or ROOT / ".venv")
sys.path.insert(0, str(HUB))
import classroom  # noqa: E402

if os.environ.get("LABKIT_TEST_HUB") != "1":
    pytest.skip("the hub test runs in its own target, make test-hub (it creates OS accounts)", allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("the hub test needs root: the hub starts each learner's server as that learner's account",
                allow_module_level=True)
if not shutil.which("useradd"):
    pytest.skip("the hub test needs useradd to create the learners' accounts", allow_module_level=True)
if not (VENV / "bin" / "jupyterhub-singleuser").exists() or not (HUB / "node_modules/.bin/configurable-http-proxy").exists():
    pytest.skip(f"JupyterHub or its proxy is not installed for {VENV}: run make hub", allow_module_level=True)

import requests  # noqa: E402  (jupyterhub's own dependency)

TAG = f"lk{os.getpid() % 100000}"
LEARNERS = [f"{TAG}{letter}" for letter in "abc"]
TEACHER = f"{TAG}t"
GROUP = f"{TAG}class"
NOTEBOOK = "00_setup_and_probes.ipynb"
EXERCISE = "02.3"  # which side to pad: answered in the learner's kernel, so their progress file records it


def free_ports() -> int:
    """A port with the next two free as well (the hub's and the proxy's APIs take them)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port > 65000:
            continue
        try:
            for offset in (0, 1, 2):
                with socket.socket() as taken:
                    taken.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue
    raise RuntimeError("no three free ports in a row on 127.0.0.1")


def run(*command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)


def processes_of(names: list[str]) -> list[int]:
    uids = {pwd.getpwnam(n).pw_uid for n in names if _exists(n)}
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid in uids:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module")
def hub():
    """The hub of a class of three (and its teacher) on 127.0.0.1, with homes in a folder of the test's own."""
    base = Path(tempfile.mkdtemp(prefix="labkit-hub-"))
    base.chmod(0o755)  # the learners reach their homes through it
    homes, state = base / "homes", base / "state"
    homes.mkdir(mode=0o755)
    env = {"LABKIT_HUB_GROUP": GROUP, "LABKIT_HUB_HOMES": str(homes), "LABKIT_HUB_STATE": str(state),
           "LABKIT_HUB_PORT": str(free_ports()), "LABKIT_HUB_TEACHER": TEACHER, "LABKIT_HUB_VENV": str(VENV),
           "LABKIT_HUB_GPU_SHARE": "auto", "LABKIT_HUB_GPUS": "2",  # two pretend GPUs: the share's environment
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process, log = None, base / "hub.log"
    try:
        added = run(str(HUB / "learners"), "add", *LEARNERS, env=env)
        assert added.returncode == 0, added.stdout + added.stderr
        passwords = dict(line.split() for line in added.stdout.splitlines())
        teacher = run("useradd", "--create-home", "--base-dir", str(homes), TEACHER)
        assert teacher.returncode == 0, teacher.stderr
        passwords[TEACHER] = uuid.uuid4().hex
        subprocess.run(["chpasswd"], input=f"{TEACHER}:{passwords[TEACHER]}", text=True, check=True)
        # the model labkit prepare converts, copied from this session's cache (hub/start then finds it ready and
        # links it into each learner's cache)
        from labkit import models

        shutil.copytree(models.smollm2_folder(), state / "cache" / "models" / "smollm2-135m")
        with open(log, "w") as out:
            process = subprocess.Popen([str(HUB / "start")], env={**os.environ, **env}, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{env['LABKIT_HUB_PORT']}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, f"the hub stopped: {log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/hub/api/", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            raise AssertionError(f"the hub did not answer in 180 s: {log.read_text()[-3000:]}")
        yield {"url": url, "passwords": passwords, "homes": homes, "process": process, "log": log, "base": base}
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the hub stops every learner's server and its proxy
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for pid in processes_of([*LEARNERS, TEACHER]):  # whatever a learner left running: by its id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in [*LEARNERS, TEACHER]:
            if _exists(name):
                run("userdel", "--remove", name)
        run("groupdel", GROUP)
        shutil.rmtree(base, ignore_errors=True)


def listening_on(port: int) -> set[str]:
    """The addresses a socket listens on at ``port``, from the kernel's own tables (/proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, at = local.partition(":")
            if state == "0A" and int(at, 16) == port:  # 0A: LISTEN
                packed = bytes.fromhex(address)
                words = b"".join(packed[i:i + 4][::-1] for i in range(0, len(packed), 4))  # little-endian words
                found.add(socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, words))
    return found


def sign_in(hub, name: str, password: str) -> requests.Response:
    """A learner signs in with a password through the hub's REST API: a token of their own comes back."""
    return requests.post(f"{hub['url']}/hub/api/users/{name}/tokens", timeout=60,
                         json={"auth": {"username": name, "password": password}, "note": "test-hub"})


def start_server(hub, name: str, token: str) -> None:
    headers = {"Authorization": f"token {token}"}
    started = requests.post(f"{hub['url']}/hub/api/users/{name}/server", headers=headers, timeout=60)
    assert started.status_code in (201, 202), f"{name}'s server: {started.status_code} {started.text}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        model = requests.get(f"{hub['url']}/hub/api/users/{name}", headers=headers, timeout=30).json()
        server = model.get("servers", {}).get("", {})
        if server.get("ready"):
            return
        time.sleep(1)
    raise AssertionError(f"{name}'s server was not ready in 180 s: {hub['log'].read_text()[-3000:]}")


async def execute(url: str, name: str, token: str, kernel: str, cells: list[str], timeout: float = 600) -> list:
    """Run ``cells`` in order in a kernel of ``name``'s server, through its websocket (jupyter_server's kernel API);
    each cell's reply status and text output, stopping at the first error."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    socket_url = f"{url.replace('http', 'ws', 1)}/user/{name}/api/kernels/{kernel}/channels"
    connection = await websocket_connect(HTTPRequest(socket_url, headers={"Authorization": f"token {token}"}))
    session, done = uuid.uuid4().hex, []
    try:
        for code in cells:
            msg_id = uuid.uuid4().hex
            header = {"msg_id": msg_id, "msg_type": "execute_request", "username": name, "session": session,
                      "version": "5.3", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            await connection.write_message(json.dumps({
                "header": header, "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                            "allow_stdin": False, "stop_on_error": True}}))
            reply, idle, text = None, False, []
            while reply is None or not idle:
                raw = await asyncio.wait_for(connection.read_message(), timeout)
                assert raw is not None, f"{name}'s kernel websocket closed"
                message = json.loads(raw)
                if message.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = message["header"]["msg_type"], message["content"]
                if kind == "execute_reply":
                    reply = content
                elif kind == "status" and content.get("execution_state") == "idle":
                    idle = True
                elif kind == "stream":
                    text.append(content["text"])
                elif kind == "error":
                    text.append(f"{content['ename']}: {content['evalue']}")
            done.append({"status": reply["status"], "text": "".join(text), "code": code})
            if reply["status"] != "ok":
                break
    finally:
        connection.close()
    return done


def notebook_cells(hub, name: str, token: str, results: str) -> list[str]:
    """Notebook 00's code cells as the learner's server holds it (copied into ~/workbook at the first start), with
    quick sizes and a results file set after its parameters cell, as papermill would."""
    got = requests.get(f"{hub['url']}/user/{name}/api/contents/{NOTEBOOK}", timeout=60,
                       headers={"Authorization": f"token {token}"})
    assert got.ok, f"{name} has no {NOTEBOOK} in ~/workbook: {got.status_code}"
    cells = []
    for cell in got.json()["content"]["cells"]:
        if cell["cell_type"] == "code":
            cells.append(cell["source"])
            if "parameters" in cell["metadata"].get("tags", []):
                cells.append(f"quick = True\nresults_path = {results!r}")
    return cells


def test_an_open_authenticator_is_refused_on_a_public_address(tmp_path):
    """JupyterHub's DummyAuthenticator takes any name and password: on 0.0.0.0 the hub stops before it listens."""
    env = {**os.environ, "LABKIT_HUB_STATE": str(tmp_path / "state"), "LABKIT_HUB_PORT": str(free_ports()),
           "LABKIT_HUB_VENV": str(VENV)}
    stopped = subprocess.run([str(VENV / "bin/jupyterhub"), "-f", str(HUB / "jupyterhub_config.py"), "--ip", "0.0.0.0",
                              "--JupyterHub.authenticator_class=dummy"], env=env, capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
    assert stopped.returncode != 0
    said = stopped.stderr.strip().splitlines()
    assert said and said[-1].startswith("labkit hub: refusing to start on address '0.0.0.0'"), stopped.stderr[-2000:]
    assert not (tmp_path / "state").exists(), "the hub went on to make its state folder"


def test_a_class_of_three(hub):
    passwords = hub["passwords"]
    first, second, third = LEARNERS
    port = int(hub["url"].rsplit(":", 1)[1])
    # the proxy, the hub's API and the proxy's API listen on loopback only, as nothing asked for another address
    for at in (port, port + 1, port + 2):
        assert listening_on(at) and all(classroom.is_loopback(a) for a in listening_on(at)), (at, listening_on(at))

    # a wrong password is refused, and a right one gives the learner a token
    assert sign_in(hub, first, passwords[first] + "x").status_code == 403
    assert sign_in(hub, first, passwords[second]).status_code == 403, "another learner's password let them in"
    tokens = {}
    for name in LEARNERS:
        answer = sign_in(hub, name, passwords[name])
        assert answer.status_code in (200, 201), f"{name} could not sign in: {answer.status_code} {answer.text}"
        tokens[name] = answer.json()["token"]
    me = requests.get(f"{hub['url']}/hub/api/user", headers={"Authorization": f"token {tokens[first]}"}, timeout=30)
    assert me.json()["name"] == first and me.json()["admin"] is False
    teacher = sign_in(hub, TEACHER, passwords[TEACHER]).json()["token"]
    listed = requests.get(f"{hub['url']}/hub/api/users", headers={"Authorization": f"token {teacher}"}, timeout=30)
    assert listed.ok and set(LEARNERS) <= {u["name"] for u in listed.json()}, "the teacher (admin) lists the class"
    refused = requests.get(f"{hub['url']}/hub/api/users", headers={"Authorization": f"token {tokens[first]}"},
                           timeout=30)
    assert refused.status_code == 403 or {u["name"] for u in refused.json()} <= {first}, "a learner sees the class"

    for name in LEARNERS:
        start_server(hub, name, tokens[name])

    # learner 1 is refused learner 2's server, through the hub and through the proxy
    as_first = {"Authorization": f"token {tokens[first]}"}
    # (JupyterHub answers 404 for a user the token may not see: it does not say whether they exist)
    assert requests.post(f"{hub['url']}/hub/api/users/{second}/server", headers=as_first,
                         timeout=30).status_code in (403, 404)
    other = requests.get(f"{hub['url']}/user/{second}/api/contents/{NOTEBOOK}", headers=as_first, timeout=30,
                         allow_redirects=False)
    assert other.status_code in (302, 403) and "content" not in other.text, f"{other.status_code}: {other.text[:300]}"

    # each learner runs notebook 00 and an exercise in a kernel of their own server
    everyone = classroom.learners(GROUP, {TEACHER})
    runs = {}

    async def learner(name: str, neighbour: str):
        home = pwd.getpwnam(name).pw_dir
        results = f"{home}/00.results.json"
        cells = notebook_cells(hub, name, tokens[name], results)
        cells.append(f"from labkit import exercises\nexercise = exercises.get({EXERCISE!r})\n"
                     "assert exercises.Bound(exercise, dict(exercise.example_context)).check('left')")
        cells.append("import json, os, pwd, shutil, sys\ntry:\n"
                     f"    os.listdir({pwd.getpwnam(neighbour).pw_dir!r}); neighbour = 'read'\n"
                     "except PermissionError:\n    neighbour = 'refused'\n"
                     "print(json.dumps({'user': pwd.getpwuid(os.getuid()).pw_name, 'python': sys.prefix, "
                     "'neighbour': neighbour, 'labkit': shutil.which('labkit'), 'share': {k: os.environ[k] for k in "
                     "('CUDA_VISIBLE_DEVICES', 'LABKIT_GPU_SHARE') if k in os.environ}}))")
        kernel = await asyncio.to_thread(
            requests.post, f"{hub['url']}/user/{name}/api/kernels", json={"name": "python3"}, timeout=120,
            headers={"Authorization": f"token {tokens[name]}"})
        assert kernel.status_code == 201, f"{name}'s kernel: {kernel.status_code} {kernel.text}"
        started = time.monotonic()
        runs[name] = await execute(hub["url"], name, tokens[name], kernel.json()["id"], cells)
        runs[name].append({"seconds": time.monotonic() - started, "results": results})

    async def whole_class():
        await asyncio.gather(*(learner(name, LEARNERS[(i + 1) % 3]) for i, name in enumerate(LEARNERS)))

    asyncio.run(whole_class())
    for name in LEARNERS:
        *cells, timing = runs[name]
        failed = [c for c in cells if c["status"] != "ok"]
        assert not failed, f"{name}: a cell failed: {failed[0]['text'][-1500:]}\n--- in:\n{failed[0]['code'][:800]}"
        seen = json.loads(cells[-1]["text"])
        assert seen["user"] == name and Path(seen["python"]) == VENV, seen  # the learner's account, the venv's kernel
        assert seen["neighbour"] == "refused", f"{name} could list another learner's home"
        assert seen["labkit"] == str(VENV / "bin" / "labkit"), seen  # `labkit progress` in a learner's terminal
        assert seen["share"] == classroom.gpu_share_env(name, everyone, 2, "auto"), seen
        data = json.loads(Path(timing["results"]).read_text())
        assert data["checks"] and all(data["checks"].values()), f"{name}'s notebook 00 checks: {data['checks']}"
        print(f"{name}: notebook 00 and exercise {EXERCISE} in {timing['seconds']:.0f} s, share {seen['share']}")

    # the teacher's view of the class
    page = hub["base"] / "class.html"
    shown = run(str(VENV / "bin" / "labkit"), "progress", "--class", str(hub["homes"]), "--page", str(page))
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line for line in shown.stdout.splitlines() if line.split() and line.split()[0] in LEARNERS}
    assert set(rows) == set(LEARNERS), shown.stdout
    assert all(" 1 of " in row for row in rows.values()), shown.stdout  # each learner: one exercise done
    assert any(line.split()[:4] == [EXERCISE, "3", "of", "3"] for line in shown.stdout.splitlines()), shown.stdout
    assert f"{TEACHER}: no progress file yet" in shown.stdout
    assert all(name in page.read_text() for name in LEARNERS)
    print(shown.stdout)

    # everything stops: each learner's server through the API, then the hub (the fixture), and no process is left
    for name in LEARNERS:
        stopped = requests.delete(f"{hub['url']}/hub/api/users/{name}/server", timeout=120,
                                  headers={"Authorization": f"token {tokens[name]}"})
        assert stopped.status_code in (202, 204), f"{name}: {stopped.status_code}"
    deadline = time.monotonic() + 60
    while processes_of(LEARNERS) and time.monotonic() < deadline:
        time.sleep(1)
    assert not processes_of(LEARNERS), "a learner's process outlived their server"
    hub["process"].send_signal(signal.SIGTERM)
    assert hub["process"].wait(timeout=90) is not None
    assert not processes_of(LEARNERS + [TEACHER])
