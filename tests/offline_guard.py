"""Refuse every network connection and name lookup that leaves this machine. The online tests install it in their
own process (a fixture) and in the scripts they start (a sitecustomize.py on PYTHONPATH, see `guard_env`), so a
test that reached the internet fails here instead of passing by luck."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable

LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")
HERE = Path(__file__).resolve().parent


class NetworkBlocked(OSError):
    """A test tried to reach an address outside 127.0.0.1."""


def _check(host: object) -> None:
    if host is not None and str(host) not in LOCAL_HOSTS:
        raise NetworkBlocked(f"tests may reach only 127.0.0.1, not {host!r}")


def install() -> Callable[[], None]:
    """Patch socket connect/connect_ex/getaddrinfo for this process; returns the function that undoes it."""
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address[0])
        return connect(self, address)

    def guarded_connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address[0])
        return connect_ex(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        _check(host.decode() if isinstance(host, bytes) else host)
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex = guarded_connect, guarded_connect_ex
    socket.getaddrinfo = guarded_getaddrinfo

    def undo() -> None:
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo

    return undo


def guard_env(folder: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: this process's) whose Python processes install the guard at start-up."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('offline_guard', {str(HERE / 'offline_guard.py')!r})\n"
        "guard = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(guard)\nguard.install()\n")
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    return env
