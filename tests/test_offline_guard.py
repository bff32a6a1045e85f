"""The suite's offline guard (tests/offline_guard.py, installed by conftest.py for the whole run): every way out of
this machine is refused, in this process and in the Python processes the tests start, `python -I` / `-E` included;
a `python -S` child, which could not load the guard, is refused at launch. And the tests' home folder is not the
user's."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import offline_guard

OUTSIDE = "10.255.255.1"  # a private address that routes nowhere: if the guard let it through, it would time out
WAYS_OUT = {
    "create_connection": f"import socket; socket.create_connection(({OUTSIDE!r}, 80), timeout=2)",
    "connect": f"import socket; s = socket.socket(); s.settimeout(2); s.connect(({OUTSIDE!r}, 80))",
    "connect_ex": f"import socket; s = socket.socket(); s.settimeout(2); s.connect_ex(({OUTSIDE!r}, 80))",
    "udp_sendto": f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ({OUTSIDE!r}, 53))",
    "getaddrinfo": "import socket; socket.getaddrinfo('huggingface.co', 443)",
    "gethostbyname": "import socket; socket.gethostbyname('huggingface.co')",
    "gethostbyname_ex": "import socket; socket.gethostbyname_ex('huggingface.co')",
    "gethostbyaddr": "import socket; socket.gethostbyaddr('8.8.8.8')",
    "urlopen": "import urllib.request; urllib.request.urlopen('https://s3.amazonaws.com/fast-ai-imageclas/x.tgz', "
               "timeout=2)",
}


@pytest.mark.parametrize("way", sorted(WAYS_OUT))
def test_every_way_out_is_refused_in_the_test_process(way):
    with pytest.raises((offline_guard.NetworkBlocked, urllib.error.URLError), match="only 127.0.0.1"):
        exec(WAYS_OUT[way], {})


def test_functions_taken_before_the_guard_are_refused_too():
    """An audit hook, not a patch of socket's functions: a reference kept from before changes nothing."""
    connect = socket.socket.connect  # what a library holding on to the original would call
    s = socket.socket()
    try:
        with pytest.raises(offline_guard.NetworkBlocked):
            connect(s, (OUTSIDE, 80))
    finally:
        s.close()


def test_this_machine_stays_reachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
        assert socket.getaddrinfo("localhost", 80)
    finally:
        server.close()


@pytest.mark.parametrize("flags", [[], ["-I"], ["-E"], ["-I", "-s"]])
def test_every_way_out_is_refused_in_python_children(flags):
    """Each way out, in a child started with these flags from the tests' own environment (as every script, `tp3`,
    torchrun and notebook kernel is)."""
    script = "\n".join(f"""try:
    exec({code!r}, {{}})
except Exception as e:
    print({name!r}, type(e).__name__, str(e)[:80])
else:
    print({name!r}, 'REACHED')""" for name, code in WAYS_OUT.items())
    p = subprocess.run([sys.executable, *flags, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines())
    assert set(lines) == set(WAYS_OUT), p.stdout
    for name, result in lines.items():
        assert "only 127.0.0.1" in result, f"{name} in a child with {flags}: {result}"


def test_a_python_child_without_site_is_refused_at_launch():
    with pytest.raises(offline_guard.NetworkBlocked, match="-S cannot load the offline guard"):
        subprocess.run([sys.executable, "-S", "-c", "pass"], timeout=60)
    with pytest.raises(offline_guard.NetworkBlocked, match="-S cannot load the offline guard"):
        subprocess.run([sys.executable, "-IS", "-c", "pass"], timeout=60)
    assert subprocess.run([sys.executable, "-c", "pass"], timeout=60).returncode == 0  # -c is not -S


def test_the_tests_never_use_the_users_home_folder():
    """HOME is a fresh folder for the whole run (conftest.py), so the package's default cache, and every other
    tool's, lies in it, here and in the processes the tests start."""
    from tp3_fastai.data.download import DEFAULT_CACHE

    home = Path(os.environ["HOME"])
    assert home.name.startswith("tp3-test-home-") and Path("~").expanduser() == home
    assert DEFAULT_CACHE.expanduser().is_relative_to(home)
    child = subprocess.run([sys.executable, "-c", "from pathlib import Path; print(Path('~').expanduser())"],
                           capture_output=True, text=True, timeout=60)
    assert child.stdout.strip() == str(home)
