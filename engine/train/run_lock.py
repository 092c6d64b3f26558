"""One live run per output directory: rank 0 holds an exclusive `flock` on `<output_dir>/run.lock` for the whole run.

Two runs writing one `output_dir` would overwrite each other's checkpoints and metrics; that is what N processes
that each believe they are a one-rank job do (a launcher the engine did not recognise). The second run is refused
with one line naming the holder (host, pid, launcher, job id, start time: the identity written into the file). The
kernel drops a `flock` when its process dies, however it dies, so the lock of a dead run is simply taken over.
A filesystem without file locks (some Lustre mounts) gets a warning and the check of the pid on this host only.
"""

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from engine.config import ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _identity(launcher: str, world_size: int) -> dict:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or ""
    return {"host": socket.gethostname(), "pid": os.getpid(), "launcher": launcher, "world_size": world_size,
            "job": job, "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(holder: dict) -> str:
    job = f", job {holder['job']}" if holder.get("job") else ""
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, {holder.get('world_size', '?')} rank(s) "
            f"via {holder.get('launcher', '?')}{job}, since {holder.get('started', '?')}")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _alive_here(holder: dict) -> bool:
    """Without file locks: is the recorded holder a live process on this host (not this one)?"""
    if holder.get("host") != socket.gethostname() or holder.get("pid") in (None, os.getpid()):
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


class RunLock:
    """`acquire()` on rank 0 before anything is written to `output_dir`; `release()` when the run ends."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, launcher: str, world_size: int) -> None:
        """Raises ConfigError when another live run holds `output_dir`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = _read(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"--output_dir={self.path.parent} is in use by a live run ({_describe(previous)}): "
                              "wait for it to end, stop it, or choose another --output_dir") from None
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            logger.warning("the filesystem of %s has no file locks: only a run on this host can be detected as "
                           "live", self.path.parent)
            if _alive_here(previous):
                os.close(fd)
                raise ConfigError(f"--output_dir={self.path.parent} is in use by a live run ({_describe(previous)}): "
                                  "wait for it to end, stop it, or choose another --output_dir") from None
        if previous:
            logger.info("output_dir lock taken over from a run that has ended (%s)", _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_identity(launcher, world_size)) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the identity stays as a record of the last run
            self._fd = None
