# JupyterHub for a class on one machine: an OS account and a server per learner, the workbook's venv as the kernel.
# Started by hub/start (as root), which documents the settings; they come from the teacher's environment
# (hub/classroom.py, settings). Safe by default: loopback only, PAM passwords, homes kept private, and no start on an
# address other machines reach with an authenticator that admits anyone (the check at the end of this file).
import sys
from pathlib import Path

from jupyterhub.app import JupyterHub

sys.path.insert(0, str(Path(__file__).resolve().parent))
import classroom  # noqa: E402  (beside this file)

c = get_config()  # noqa: F821  (JupyterHub defines it while it reads this file)
s = classroom.settings()

# Where the hub listens: 127.0.0.1 unless the teacher names an address (LABKIT_HUB_IP, or --ip).
c.JupyterHub.ip = s["ip"]
c.JupyterHub.port = s["port"]
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = s["hub_port"]
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{s['proxy_api_port']}"
c.ConfigurableHTTPProxy.command = [str(classroom.REPO / "hub" / "node_modules" / ".bin" / "configurable-http-proxy")]

# The hub's state: its database and cookie secret, readable by root only (the folder is made after the check below).
c.JupyterHub.db_url = f"sqlite:///{s['state'] / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(s["state"] / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(s["state"] / "proxy.pid")

# Who signs in: an OS account per learner (its password, through PAM), members of the class's group; the teacher is
# the hub's admin. The group's members are listed at start so that they can sign in through the REST API too.
c.JupyterHub.authenticator_class = "pam"
c.PAMAuthenticator.allowed_groups = {s["group"]}
c.Authenticator.admin_users = s["teachers"]
c.Authenticator.allowed_users = set(classroom.learners(s["group"], s["teachers"]))

# A server per learner, run as that learner's account (Unix permissions keep homes apart), from the workbook's venv:
# its Python is the learners' kernel. The notebooks are copied into ~/workbook at the first start, and the models
# hub/start prepared once (labkit prepare, into the state folder's cache) are linked into the learner's cache.
singleuser = s["venv"] / "bin" / "jupyterhub-singleuser"
if not singleuser.exists():
    sys.exit(f"labkit hub: {singleuser} is missing; run `make hub`, or set LABKIT_HUB_VENV to the workbook's venv.")
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = [str(singleuser)]
c.Spawner.notebook_dir = "~/workbook"
c.Spawner.default_url = "/lab"
c.Spawner.env_keep = ["LANG", "LC_ALL", "JUPYTERHUB_SINGLEUSER_APP", *classroom.KEPT]
# the venv first, so that a learner's terminal finds `labkit progress`; not root's PATH, which may name its own folders
c.Spawner.environment = {"PATH": f"{s['venv'] / 'bin'}:/usr/local/bin:/usr/bin:/bin"}
c.Spawner.start_timeout = c.Spawner.http_timeout = 120  # a kernel machine busy with a class starts servers slowly
gpus = classroom.gpu_count(s["gpus"])
try:  # a bad LABKIT_HUB_GPU_SHARE stops the hub here, with one sentence
    classroom.gpu_share_env("check", [], gpus, s["gpu_share"])
except ValueError as error:
    sys.exit(f"labkit hub: {error}")


def prepare_learner(spawner):
    """Before a learner's server starts: the workbook in their home, and their share of the GPUs."""
    import pwd

    account = pwd.getpwnam(spawner.user.name)
    classroom.copy_workbook(Path(account.pw_dir), account.pw_uid, account.pw_gid)
    classroom.seed_cache(Path(account.pw_dir), account.pw_uid, account.pw_gid, s["state"] / "cache")
    share = classroom.gpu_share_env(spawner.user.name, classroom.learners(s["group"], s["teachers"]), gpus,
                                    s["gpu_share"])
    spawner.environment = {**spawner.environment, **share}
    if share:
        spawner.log.info("GPU share of %s: %s", spawner.user.name, share)


c.Spawner.pre_spawn_hook = prepare_learner

# The check, last, on what JupyterHub will use: the command line's --ip and authenticator win over this file.
# Add your own settings above it.
command_line = JupyterHub.instance().cli_config.get("JupyterHub", {})
if "ip" in command_line:
    host = command_line["ip"]
elif "bind_url" in command_line:
    from urllib.parse import urlparse

    host = urlparse(command_line["bind_url"]).hostname or ""
else:
    host = c.JupyterHub.ip
why = classroom.refusal(host, command_line.get("authenticator_class", c.JupyterHub.authenticator_class))
if why:
    sys.exit(why)
s["state"].mkdir(mode=0o700, parents=True, exist_ok=True)
