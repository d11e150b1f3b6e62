"""Writes that either complete or leave the previous state untouched, and never touch what
freedeploy did not create.

- A file is written to a temporary sibling, flushed to disk and renamed over the target; a
  directory is filled under a temporary sibling name and renamed into place at the end. A crash
  or an exception at any point leaves the old file or directory as it was.
- ``overwrite`` replaces only a directory of the expected kind (a bundle, a run dir, an engine
  set: recognised by its manifest file) and refuses an output that is, contains or lies inside
  one of the command's inputs.
- Files and directories come out with the user's umask (as ``open`` and ``mkdir`` would make
  them); a replaced file keeps its permission bits.
- Temporary names carry the writer's host and process id (``.NAME.<host>-<pid>.<random>.partial``), so
  the next writer of the same target removes leftovers of a killed writer (ours, and only once
  that process is gone) and nothing else.
- ``exclusive`` serialises writers of one directory (two ``calibrate`` runs on one bundle): the
  second waits for the first, then reads what the first wrote.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from runtimes.errors import ConfigError

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_directory", "Replaceable", "exclusive", "LOCK_FILE",
           "check_separate", "check_target", "file_mode", "is_temporary"]

log = logging.getLogger(__name__)

LOCK_FILE = ".freedeploy.lock"  # inside a directory whose writers take turns (a bundle)
_HOST = re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname())[:40] or "host"


@dataclass(frozen=True)
class Replaceable:
    """A kind of directory freedeploy writes, recognised by its manifest: only such a directory is
    replaced by ``overwrite``."""

    what: str  # "a freedeploy bundle"
    marker: str  # "bundle.json"
    key: str | None = None  # a field the marker's JSON object must have ("stages"), so a file of that name
    # written by another tool is not mistaken for ours

    def holds(self, path: Path) -> bool:
        marker = path / self.marker
        if marker.is_symlink() or not marker.is_file():
            return False
        if self.key is None:
            return True
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return False
        return isinstance(data, dict) and self.key in data


def _umask() -> int:
    """The process umask, read without changing it where the platform allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting, then restore at once
    os.umask(mask)
    return mask


def file_mode(directory: bool = False) -> int:
    """What ``open`` (0666) or ``mkdir`` (0777) would give a new file under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def _tag() -> str:
    return f"{_HOST}-{os.getpid()}"


def _temporary(name: str, suffix: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\..*\.{suffix}$")


def is_temporary(name: str, target: str) -> bool:
    """Whether ``name`` is one of our temporary siblings of ``target`` (a write in progress or left over)."""
    return any(_temporary(target, s).match(name) for s in ("tmp", "partial", "old"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def _clean_stale(parent: Path, target: str) -> None:
    """Remove temporary siblings of ``target`` left by writers on this host that no longer run."""
    patterns = [_temporary(target, s) for s in ("tmp", "partial", "old")]
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = next((p.match(entry.name) for p in patterns if p.match(entry.name)), None)
        if m is None or m["host"] != _HOST or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        log.info("removing %s, left behind by an interrupted freedeploy process", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    _clean_stale(path.parent, path.name)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_separate(out: Path, inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse an output that is, contains or lies inside one of the inputs."""
    try:
        o = Path(out).resolve()
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"cannot use {out} as an output: {exc}") from None
    for given in inputs:
        try:
            i = Path(given).resolve()
        except (OSError, RuntimeError):
            continue
        if o == i or i in o.parents or o in i.parents:
            relation = "is" if o == i else "lies inside" if i in o.parents else "contains"
            raise ConfigError(f"the output {out} {relation} the input {given}; write to a separate path")


def _describe(path: Path) -> str:
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError:
        return "something unreadable"
    if not names:
        return "an empty directory"
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return "a directory holding " + ", ".join(names[:5]) + more


def _make_parent(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"cannot write {target}: a part of its path is a file, not a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from None


def check_target(target: Path, overwrite: bool, kind: Replaceable | None,
                 inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Whether ``atomic_directory`` may write ``target``: call it early to fail before long work."""
    target = Path(target)
    check_separate(target, inputs)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ConfigError(f"{target} exists and is not a directory; choose another output path")
    if target.exists():
        if not overwrite:
            raise ConfigError(f"{target} already exists; choose another output path or pass --overwrite")
        if kind is not None and not kind.holds(target):
            raise ConfigError(f"refusing to replace {target}: it is not {kind.what} (no {kind.marker} of ours; it is "
                              f"{_describe(target)}); choose another output path or remove it yourself")
    for parent in target.parents:  # a file in the way, or a place nobody may write
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"cannot write {target}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"cannot write {target}: {parent} is not writable")
            break


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False, kind: Replaceable | None = None,
                     inputs: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block finishes without error.

    An existing ``target`` is an error unless ``overwrite``; then it is replaced, only after the new
    directory is complete, and only if it is a directory of ``kind`` (any existing directory when
    ``kind`` is None: for paths freedeploy alone names, such as checkpoints).
    """
    target = Path(target)
    check_target(target, overwrite, kind, inputs)
    _make_parent(target)
    _clean_stale(target.parent, target.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_tag()}.", suffix=".partial", dir=target.parent))
    except OSError as exc:
        raise ConfigError(f"cannot write beside {target}: {exc.strerror or exc}") from None
    try:
        os.chmod(tmp, file_mode(directory=True))  # mkdtemp makes 0700: give the tree the user's umask
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.{_tag()}.{os.urandom(4).hex()}.old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive(directory: str | os.PathLike, waiting: str = "") -> Iterator[None]:
    """Hold the directory's writer lock (``LOCK_FILE`` inside it) for the block; a second writer
    waits until the first is done. ``waiting`` is logged when the lock is busy."""
    try:
        import fcntl
    except ImportError:  # not POSIX: writers are not serialised here
        yield
        return
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), file_mode())
    except OSError as exc:
        raise ConfigError(f"cannot lock {directory} for writing: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            log.warning("%s", waiting or f"waiting for another writer of {directory}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
