"""Refuse every network connection, datagram and name lookup that leaves this machine, for the whole pytest run.

`conftest.py` calls `guard_session()` when pytest starts, before any fixture or test module runs:
* in the pytest process, an audit hook (`sys.addaudithook`, which cannot be removed) refuses `socket.connect`
  (and `connect_ex`, `create_connection`), `sendto` / `sendmsg` (UDP), `getaddrinfo`, `gethostbyname`,
  `gethostbyname_ex`, `gethostbyaddr` and `getnameinfo` for any host but 127.0.0.1 / ::1 / localhost: unlike a patch of
  `socket`'s functions, it also sees code that kept a reference to them and C code that goes through them;
* every Python child started from this interpreter's environment (scripts, `tp3`, torchrun, accelerate, notebooks'
  kernels), `python -I` and `-E` ones included, installs the same hook at start-up: a `.pth` file in this
  environment's site-packages (which `site` reads in isolated mode too) loads this file when the child's
  environment carries TP3_OFFLINE_GUARD (the path of this file; inert in any other process);
* a Python child started with `-S` (no `site`, so no guard) is refused at launch.
A test that reached the internet fails here instead of passing by luck.
"""
from __future__ import annotations

import os
import re
import sys
import sysconfig
from pathlib import Path

LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost", "0.0.0.0")
ENV = "TP3_OFFLINE_GUARD"
HERE = Path(__file__).resolve()


class NetworkBlocked(OSError):
    """A test tried to reach an address outside this machine."""


# One hook and one error class per process: a guarded Python child that imports this file again (a pytest-xdist
# worker, whose conftest guards its session too) keeps the hook installed at its start-up, and the class that hook
# raises is the one its tests name as offline_guard.NetworkBlocked.
NetworkBlocked = getattr(sys, "tp3_offline_guard", None) or NetworkBlocked


def _check(host: object) -> None:
    if host is None:
        return
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if str(host) not in LOCAL_HOSTS:
        raise NetworkBlocked(f"tests may reach only 127.0.0.1, not {host!r}")


def _address_host(address: object) -> object:
    """The host of a socket address; None for addresses that are not IP (AF_UNIX paths, netlink)."""
    if isinstance(address, tuple) and address and isinstance(address[0], (str, bytes)):
        return address[0]
    return None


_PYTHON = re.compile(r"(^|/)python[0-9.]*$")


def _python_without_site(args: object) -> bool:
    """Whether a command line starts a Python interpreter with -S (no site: the guard cannot load in it)."""
    if isinstance(args, (str, bytes)):
        args = str(args).split()
    args = [os.fsdecode(a) for a in (args or [])]
    if not args or not _PYTHON.search(args[0]):
        return False
    for a in args[1:]:
        if a in ("-c", "-m") or not a.startswith("-") or a.startswith("--"):
            return False
        if "S" in a[1:] and not a.startswith("-X") and not a.startswith("-W"):
            return True
    return False


def _hook(event: str, args: tuple) -> None:
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        _check(_address_host(args[1]))
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        _check(args[0])
    elif event == "socket.getnameinfo":
        _check(_address_host(args[0]))
    elif event in ("subprocess.Popen", "os.exec", "os.posix_spawn"):
        if _python_without_site(args[1]):
            raise NetworkBlocked(f"a Python child started with -S cannot load the offline guard: {args[1]!r}")
    elif event == "os.system":
        if _python_without_site(args[0]):
            raise NetworkBlocked(f"a Python child started with -S cannot load the offline guard: {args[0]!r}")


def install() -> None:
    """Install the audit hook in this process (once; an audit hook stays for the life of the process)."""
    if getattr(sys, "tp3_offline_guard", None) is None:
        sys.tp3_offline_guard = NetworkBlocked
        sys.addaudithook(_hook)


def pth_file() -> Path:
    """The start-up file of this pytest process in the environment's site-packages."""
    return Path(sysconfig.get_paths()["purelib"]) / f"tp3_offline_guard_{os.getpid()}.pth"


def guard_session() -> Path:
    """Guard this process and every Python child it starts (see the module docstring); returns the .pth file to
    remove when the session ends."""
    install()
    remove_stale()
    os.environ[ENV] = str(HERE)
    pth = pth_file()
    # site executes a .pth line that starts with "import"; the whole line runs, and it must not fail elsewhere
    pth.write_text(f"import os; p = os.environ.get({ENV!r}); p and os.path.isfile(p) and "
                   "__import__('runpy').run_path(p, run_name='tp3_offline_guard_child')\n")
    return pth


def guard_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: this process's) whose Python processes install the guard at start-up (for a test
    that builds a child's environment from scratch)."""
    return dict(os.environ if env is None else env, **{ENV: str(HERE)})


def remove_stale() -> None:
    """Remove the start-up files of guarded pytest runs that ended without removing theirs (killed)."""
    for f in Path(sysconfig.get_paths()["purelib"]).glob("tp3_offline_guard_*.pth"):
        pid = f.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and sys.platform.startswith("linux"):
            f.unlink(missing_ok=True)


if __name__ == "tp3_offline_guard_child":
    install()  # once, though several guarded runs at once each leave a .pth file
