"""Output paths checked before the work that fills them, and an exclusive lock on a job's output.

`check_output_file` / `check_output_dir` fail with one line before any generation or training, so an
unwritable path never costs the finished work. `OUTPUT.lock` holds the owner (host, pid, SLURM job) and is `flock`ed while the job runs. The kernel
drops a flock when its process dies (kill -9 included), so on one host a lock whose flock is free is
stale and is taken over. A holder on another host whose filesystem does not carry flocks across
nodes is judged by its lease: the owner touches the file every LEASE_REFRESH_S seconds, and a lock
untouched for LEASE_STALE_S seconds (or left by an earlier run of the same SLURM job, i.e. a requeue)
is stale.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from pp_runtime.errors import ConfigError

LEASE_REFRESH_S = 10.0
LEASE_STALE_S = 120.0


def check_output_file(path: Path, option: str, input_path: Optional[Path] = None) -> None:
    """A file that can be created or replaced at `path` (its folder is created now)."""
    if input_path is not None and path == input_path:
        raise ConfigError(f"{option}={str(path)!r} is the input file; results would overwrite it; choose another {option}")
    if path.is_dir():
        raise ConfigError(f"{option}={str(path)!r} is a folder; give a file path")
    check_output_dir(path.parent, option)
    probe = path.with_name(f".{path.name}.probe-{os.getpid()}")
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write {option}={str(path)!r} ({e.strerror}); choose a writable path") from None


def check_output_dir(path: Path, option: str) -> None:
    """A folder that exists (created now) and takes new files."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{option}: {str(path)!r} (or a parent) is a file, not a folder; choose another path") from None
    except OSError as e:
        raise ConfigError(f"{option}: cannot create the folder {str(path)!r} ({e.strerror}); choose a writable path") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}: the folder {str(path)!r} is not writable; choose a writable path")


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "started": time.time()}


class OutputLock:
    """`OutputLock.acquire(path, what)` or a one-line ConfigError naming the job that holds it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="output-lock-lease", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, path: Path, what: str) -> "OutputLock":
        check_output_dir(path.parent, "output")
        for _ in range(5):  # retried when the file was replaced between open and flock
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConfigError(f"cannot write beside {what} ({path}: {e.strerror}); choose a writable output=") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                held = _read_owner(path)
                os.close(fd)
                raise ConfigError(f"{what} is in use by another job ({_describe(held)}); wait for it to finish "
                                  f"or choose another output=") from None
            if _same_file(fd, path):
                break
            os.close(fd)
        else:
            raise ConfigError(f"could not take the lock {path}: it keeps being replaced by another job")
        previous = _read_owner(path)
        if previous is not None and _live_elsewhere(previous, path):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise ConfigError(f"{what} is in use by another job ({_describe(previous)}); wait for it to finish, "
                              f"or delete {path} if that job is gone")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        os.fsync(fd)
        return cls(path, fd)

    def _refresh(self) -> None:
        while not self._stop.wait(LEASE_REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no waiter can lock the unlinked file)."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_owner(path: Path) -> Optional[dict]:
    try:
        owner = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict):
        return None
    try:
        owner["age_s"] = time.time() - path.stat().st_mtime
    except OSError:
        pass
    return owner


def _live_elsewhere(owner: dict, path: Path) -> bool:
    """Whether a lock we could flock may still belong to a live job on another host."""
    if owner.get("host") == socket.gethostname():
        return False  # same host: its flock would have stopped us, so its process is gone
    job = os.environ.get("SLURM_JOB_ID")
    if job is not None and owner.get("slurm_job") == job and owner.get("slurm_restart") != os.environ.get(
            "SLURM_RESTART_COUNT", "0"):
        return False  # an earlier incarnation of this requeued job
    return float(owner.get("age_s", 0.0)) < LEASE_STALE_S


def _describe(owner: Optional[dict]) -> str:
    if owner is None:
        return "owner unknown"
    job = f", SLURM job {owner['slurm_job']}" if owner.get("slurm_job") else ""
    age = f", lock refreshed {owner['age_s']:.0f}s ago" if "age_s" in owner else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}{age}"
