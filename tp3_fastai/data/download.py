"""Named archives (full MNIST, image folders) fetched once into a cache, from their real address or a mirror.

An archive is downloaded to a temporary file (its length checked against Content-Length), extracted into a
temporary folder and renamed into place, so a dropped connection, a corrupt archive or a kill never leaves a
half-extracted dataset; the next call finds the extracted folder and downloads nothing.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

from ..core.config import DEFAULT_CACHE  # noqa: F401 (the one default, imported here by the data modules)
MIRROR_ENV = "TP3_MIRROR"  # read by the command line (cli.py) as the default of --mirror
CHUNK = 1 << 20
PROBE_TIMEOUT = 3.0  # seconds a server gets to answer the connection check, so that offline is known at once
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


class DownloadError(RuntimeError):
    """A named dataset or weights file could not be downloaded (offline, blocked, bad URL, damaged archive)."""


def archive_url(url: str, mirror: str | None = None) -> str:
    """`url`, or the file of the same name under `mirror` (a base address: http(s)://host/path or file:///folder)."""
    if not mirror:
        return url
    return f"{str(mirror).rstrip('/')}/{url.rsplit('/', 1)[-1]}"


def archive_stem(filename: str) -> str:
    """'mnist_png.tgz' -> 'mnist_png' (the folder an archive extracts to)."""
    for suffix in ARCHIVE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    raise ValueError(f"{filename} is not a .tgz, .tar.gz, .tar or .zip archive")


def unreachable(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when the server of `url` answers (with any HTTP status) within `timeout` seconds, else why not in one
    line: a connection check before a download, so that offline (refused, no route, no name, silence) is said in
    seconds instead of after a client's retries. Addresses that are not http(s) (file://) are not checked."""
    if not url.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:  # the server answered (403, 404, 405, ...): it is reachable
        return None
    except Exception as e:  # URLError (refused, no route, no name), socket timeouts, proxies that fail
        reason = getattr(e, "reason", e)
        return f"no answer within {timeout:g} s" if isinstance(reason, TimeoutError) else _why(reason)


def fetch(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` through a temporary file renamed into place once every byte has arrived."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            expected = r.headers.get("Content-Length")
            got = 0
            while chunk := r.read(CHUNK):  # http.client returns short at a dropped connection, not always raising
                f.write(chunk)
                got += len(chunk)
        if expected is not None and got != int(expected):
            raise DownloadError(f"the connection dropped after {got:,} of {int(expected):,} bytes")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def _single_folder(tmp: Path) -> Path:
    """The archive's one top-level folder (mnist_png/, hymenoptera_data/), or the extraction folder itself."""
    entries = [e for e in tmp.iterdir() if not e.name.startswith((".", "__MACOSX"))]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp


def untar(tar: tarfile.TarFile, folder: Path) -> None:
    """Extract every member inside `folder`, refusing absolute paths, '..', links that point out of it and device
    files (a ValueError): tarfile's 'data' filter where this Python has it (3.10.12, 3.11.4 and later), the same
    checks made here before extracting on older patch releases (Debian 12's Python 3.11.2 among them)."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(folder, filter="data")
        return
    root = folder.resolve()
    for m in tar.getmembers():
        target = (root / m.name).resolve()
        # a symbolic link's target is relative to the link's folder, a hard link's to the archive's root
        points_to = [(target.parent if m.issym() else root) / m.linkname] if m.issym() or m.islnk() else []
        if m.isdev() or not all(p.resolve().is_relative_to(root) for p in [target, *points_to]):
            raise ValueError(f"archive member {m.name!r} would land outside the extraction folder or is a device")
    tar.extractall(folder)


def extract(archive: Path, dest: Path) -> Path:
    """Unpack `archive` into a temporary folder beside `dest` and rename it to `dest` (a ValueError if damaged)."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        try:
            if archive.name.endswith(".zip"):
                with zipfile.ZipFile(archive) as z:  # ZipFile.extractall keeps members inside the folder
                    z.extractall(tmp)
            else:
                with tarfile.open(archive) as t:
                    untar(t, tmp)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise ValueError(f"{archive} is not a readable archive ({_why(e)})") from e
        try:
            os.rename(_single_folder(tmp), dest)
        except OSError:
            if not dest.is_dir():  # not another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def download(name: str, url: str, alternative: str, cache_dir: str | Path = DEFAULT_CACHE,
             mirror: str | None = None, log: Callable[[str], None] | None = None) -> Path:
    """The extracted folder of the archive at `url` (or at `mirror`), downloaded into `<cache_dir>/data/` once.

    A failure becomes one DownloadError naming the address and saying what to do instead (`alternative`); the
    archive itself is deleted once extracted.
    """
    src = archive_url(url, mirror)
    filename = src.rsplit("/", 1)[-1]
    root = Path(cache_dir).expanduser() / "data"
    dest = root / archive_stem(filename)
    if dest.is_dir():
        return dest
    archive = root / filename
    if log:
        log(f"downloading {name} from {src} into {dest}")
    try:
        why = unreachable(src)
        if why is not None:
            raise ConnectionError(why)
        fetch(src, archive)
    except Exception as e:  # urllib / http.client / socket raise many types; all mean "not downloaded"
        raise DownloadError(f"could not download {name} from {src} ({_why(e)}); nothing was kept. Offline or "
                            f"blocked? Run again once it is reachable, or point --mirror ({MIRROR_ENV}) at a copy. "
                            f"Instead: {alternative}") from e
    try:
        return extract(archive, dest)
    except ValueError as e:
        raise DownloadError(f"{e}: it was deleted, run again to download it anew (if this repeats, the copy at "
                            f"{src} is damaged). Instead: {alternative}") from e
    finally:
        archive.unlink(missing_ok=True)


def _why(e: BaseException) -> str:
    """'Type: first line of the message', for one-line errors."""
    if not isinstance(e, BaseException):  # URLError.reason can be a plain string
        return str(e)
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
