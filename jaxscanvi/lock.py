"""One writer per folder: a lock file created with O_CREAT | O_EXCL.

``<folder>/.jaxscanvi.lock`` holds JSON: the writer's pid, host, start time
and what it writes. A second writer gets `FolderLockedError`. The lock is
stale, and taken over, when

- its host is this host and its pid is dead (or now names a process started
  after the lock was written: the pid was reused);
- its host is another host and its time is older than ``STALE_AFTER_S``
  (``JAXSCANVI_LOCK_STALE_S``, default 6 hours; a training run rewrites the
  time every epoch, so a live run's lock stays fresh);
- it cannot be read (a writer died between creating and filling it) and is
  older than 60 s.

Locks are re-entrant within a process: a training run holds its checkpoint
folder's lock, and each checkpoint write inside it takes it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import FolderLockedError

LOCK_NAME = ".jaxscanvi.lock"
STALE_AFTER_S = float(os.environ.get("JAXSCANVI_LOCK_STALE_S", 6 * 3600))
UNREADABLE_STALE_S = 60.0
_held: dict[str, int] = {}  # lock path -> depth, for this process


def _alive(pid: int, since: float) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    state, started = _proc_stat(pid)
    if state == "Z":  # exited, not yet reaped by its parent
        return False
    return started is None or started <= since + 1.0


def _proc_stat(pid: int) -> tuple[str | None, float | None]:
    """``pid``'s state letter and start time (Linux /proc); None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])
        with open("/proc/stat") as stat:
            boot = next(float(line.split()[1]) for line in stat if line.startswith("btime"))
        return fields[0], boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None, None


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(info, dict)
        and isinstance(info.get("pid"), int)
        and isinstance(info.get("host"), str)
        and isinstance(info.get("time"), (int, float))
    )
    return info if ok else None


def is_stale(path: Path, info: dict | None, now: float | None = None) -> bool:
    """The stale-lock rule of the module docstring."""
    now = time.time() if now is None else now
    if info is None:
        try:
            return now - path.stat().st_mtime > UNREADABLE_STALE_S
        except FileNotFoundError:
            return True
    if info["host"] == socket.gethostname():
        return not _alive(info["pid"], info["time"])
    return now - info["time"] > STALE_AFTER_S


def _describe(info: dict | None) -> str:
    if info is None:
        return "a process that has not finished writing its lock"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["time"]))
    return f"pid {info['pid']} on {info['host']} ({info.get('what', 'writing')}, lock time {when})"


def _write_info(path: Path, fd: int, what: str) -> None:
    data = json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "what": what}
    ).encode()
    try:  # (no fsync: after a power loss its pid is dead, so the lock is stale anyway)
        os.write(fd, data)
    finally:
        os.close(fd)


def _take_over(path: Path, seen: dict | None) -> None:
    """Move a stale lock aside; put it back if another process replaced it meanwhile."""
    aside = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    if _read(aside) != seen:  # a fresh lock was taken between our read and the move
        with contextlib.suppress(OSError):  # yet another lock is there: then it stands
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def acquire(dir_path, what: str) -> Path:
    """Take ``dir_path``'s lock (creating the folder); the lock file's path."""
    d = Path(dir_path)
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d} exists and is not a folder. Fix: pass a folder path")
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_NAME
    key = str(path.resolve())
    if key in _held:
        _held[key] += 1
        return path
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _read(path)
            if is_stale(path, info):
                _take_over(path, info)
                continue
            raise FolderLockedError(
                f"{str(d)!r} is being written by another process: {_describe(info)}; two "
                f"writers would mix their files. Fix: wait for it to finish, or write to "
                f"another folder; if that process is gone for good (e.g. its machine "
                f"crashed), delete {str(path)!r}"
            ) from None
        try:
            _write_info(path, fd, what)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        _held[key] = 1
        return path
    raise FolderLockedError(
        f"{str(d)!r}: its lock changed hands repeatedly while being "
        "taken. Fix: make sure only one process writes this folder"
    )


def refresh(path: Path) -> None:
    """Rewrite the lock's time (a long run on another host must not look stale)."""
    tmp = path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
    info = _read(path) or {}
    info.update(pid=os.getpid(), host=socket.gethostname(), time=time.time())
    try:
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)
    except OSError:  # a full disk must not stop training over a lock's time
        tmp.unlink(missing_ok=True)


def release(path: Path) -> None:
    key = str(path.resolve())
    depth = _held.get(key, 0) - 1
    if depth > 0:
        _held[key] = depth
        return
    _held.pop(key, None)
    info = _read(path)
    if info is not None and info["pid"] == os.getpid():
        path.unlink(missing_ok=True)


@contextmanager
def locked(dir_path, what: str):
    """Hold ``dir_path``'s lock inside the block."""
    path = acquire(dir_path, what)
    try:
        yield path
    finally:
        release(path)
