"""Run at the start of every test kernel (an IPython startup file) and imported by the test process itself.

1. The deprecation canary: a FutureWarning or DeprecationWarning attributed to torch, transformers, accelerate,
   bitsandbytes, labkit or a notebook cell is an error, so a release that deprecates what the workbook teaches fails
   CI the day it comes out. A cell that shows an old API on purpose catches its warning itself (and carries the
   cell tag ``old-api-on-purpose``).
2. No network: a connection to anything but loopback is refused at once (the kernel and torchrun use loopback).

``python tests/kernel_guard.py`` makes an IPYTHONDIR holding this file as a startup file and prints its path.
"""

import errno
import ipaddress
import socket
import warnings

WATCHED = r"(torch|transformers|accelerate|bitsandbytes|labkit|__main__)(\.|$)"
# Deprecations inside a library's own code, not caused by the workbook (each with where it comes from):
KNOWN = [
    ("`torch.jit.script_method` is deprecated", DeprecationWarning),  # torch/utils/mkldnn.py, on torch's own import
]


def install_canary() -> None:
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("error", category=category, module=WATCHED)
    for message, category in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)


def _loopback(host) -> bool:
    """127.0.0.0/8, ::1, their IPv4-mapped forms, and the unspecified address (which connects to this machine)."""
    if host in ("localhost", "", None):
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or address.is_unspecified or bool(mapped and (mapped.is_loopback or mapped.is_unspecified))


def install_network_block() -> None:
    if getattr(socket.socket.connect, "_labkit_guard", False):
        return
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def outbound(sock, address) -> bool:
        return sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0])

    def guarded_connect(sock, address):
        if outbound(sock, address):
            raise ConnectionRefusedError(f"outbound connection to {address[0]}:{address[1]} refused: the tests run offline")
        return connect(sock, address)

    def guarded_connect_ex(sock, address):  # callers probing a port expect an error number, not an exception
        return errno.ECONNREFUSED if outbound(sock, address) else connect_ex(sock, address)

    guarded_connect._labkit_guard = True
    socket.socket.connect, socket.socket.connect_ex = guarded_connect, guarded_connect_ex


# Hides packages as if they were not installed: importlib.util.find_spec says None and an import fails.
BLOCKER = '''
import importlib.abc, importlib.util, sys

BLOCKED = {blocked!r}


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the tests)", name=name)
        return None


_find_spec = importlib.util.find_spec


def _hidden_find_spec(name, package=None):
    if name.split(".")[0] in BLOCKED:
        return None
    return _find_spec(name, package)


sys.meta_path.insert(0, _Blocker())
importlib.util.find_spec = _hidden_find_spec
for _name in [n for n in sys.modules if n.split(".")[0] in BLOCKED]:
    del sys.modules[_name]
'''

# The optional packages whose absence changes a notebook's cells (skips in 04, 05 and 06). The browser test hides them
# all: JupyterLab runs the notebooks as a learner who installed the core packages only (make test runs them with).
OPTIONAL = {"bitsandbytes", "torchao", "fastapi", "uvicorn", "openai", "optimum"}


def hide_packages(profile: str, names) -> None:
    """Make the kernels of an IPYTHONDIR from make_profile start with ``names`` hidden (BLOCKER)."""
    from pathlib import Path

    (Path(profile) / "profile_default" / "startup" / "01-hidden-packages.py").write_text(
        BLOCKER.format(blocked=set(names)))


def make_profile(base=None) -> str:
    """An IPYTHONDIR whose default profile runs this file when a kernel starts."""
    import shutil
    import tempfile
    from pathlib import Path

    root = Path(base) if base else Path(tempfile.mkdtemp(prefix="labkit-kernel-"))
    startup = root / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(__file__, startup / "00-labkit-guard.py")
    return str(root)


if __name__ == "__main__":
    if "get_ipython" in globals():  # running as a kernel's startup file
        install_canary()
        install_network_block()
    else:
        print(make_profile())
