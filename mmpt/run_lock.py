"""A lock file that keeps a second ``mmpt fit`` out of a run folder that a live fit writes.

The lock is a small JSON file beside the run folder (``runs/<name>/.version_3.lock`` for
``runs/<name>/version_3``; beside it, not inside, so a fresh run folder stays empty until the
logger writes). It is created with ``O_CREAT | O_EXCL``, so of two fits only one can make it,
on any file system that honours exclusive creation (local disks, NFSv3+, Lustre, GPFS). It holds
the holder's pid, host, process start time and start date; a lock whose process is gone from
this host (or whose pid now belongs to a process started later) is stale and is taken over with a
warning, and so is the lock of an earlier run of the same SLURM job (a requeued job restarts with
a higher ``SLURM_RESTART_COUNT``, often on another node). Any other lock held from another host is
never presumed stale: the error says how to remove it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any


class RunFolderError(ValueError):
    """A fit cannot use the run folder it was given (a user error: ``error:`` line, exit 2)."""


class RunLockedError(RunFolderError):
    """Another live fit holds the run folder's lock."""


def lock_path(run_dir: str | Path) -> Path:
    """The lock file of a run folder: ``<parent>/.<folder name>.lock``."""
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name or 'run'}.lock"


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``; None elsewhere or if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after "pid (comm)"


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the holder's process (on this host) still runs."""
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    started = holder.get("proc_start")
    return started is None or _start_time(pid) in (None, started)


def describe(holder: dict[str, Any]) -> str:
    """``pid P on host H, started DATE`` for messages."""
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')}"
    )


class RunLock:
    """Exclusive claim of one run folder by this process.

    Args:
        run_dir: The run folder (it need not exist yet).
        what_to_do: The advice of the refusal (how to start a separate run instead).
    """

    def __init__(self, run_dir: str | Path, what_to_do: str = "") -> None:
        self.run_dir = Path(run_dir)
        self.path = lock_path(run_dir)
        self.what_to_do = what_to_do
        self.held = False
        self._record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "proc_start": _start_time(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        }

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record, f)
        return True

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _read(self, path: Path | None = None) -> dict[str, Any] | None:
        try:
            return json.loads((path or self.path).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # a holder killed between create and write: empty file
            return {}

    def acquire(self) -> RunLock:
        """Take the lock; take over a stale one (with a warning).

        Returns:
            self.

        Raises:
            RunLockedError: A live process holds it, or a process on another host does.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            holder = self._read()
            if holder is None:  # released meanwhile
                continue
            local = holder.get("host") == self._record["host"]
            if holder and (not local or _alive(holder)) and not self._requeued_from(holder):
                raise RunLockedError(self._refusal(holder))
            if not holder and time.time() - self._mtime() < 10:  # its holder is writing it
                raise RunLockedError(self._refusal(holder))
            self._take_over(holder)
        holder = self._read() or {}
        raise RunLockedError(self._refusal(holder))

    def _requeued_from(self, holder: dict[str, Any]) -> bool:
        """Whether the holder is an earlier run of this SLURM job (requeued since: it is gone)."""
        job = self._record["slurm_job"]
        restart = holder.get("slurm_restart") or 0
        return (
            job is not None
            and holder.get("slurm_job") == job
            and restart < self._record["slurm_restart"]
        )

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Remove a stale lock, unless another process replaced it meanwhile."""
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if self._read(aside) != stale:  # someone else's fresh lock: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        who = describe(stale) if stale else "an unfinished lock file"
        warnings.warn(
            f"{self.run_dir}: taking over the stale lock of a fit that is gone ({who})",
            stacklevel=3,
        )

    def _refusal(self, holder: dict[str, Any]) -> str:
        return (
            f"run folder {self.run_dir} is in use by another fit: {describe(holder)} "
            f"(lock file {self.path}). {self.what_to_do} If that fit is no longer running "
            f"(e.g. its node was lost), delete {self.path} and run again."
        )

    def release(self) -> None:
        """Remove the lock file if this process still holds it (idempotent)."""
        if self.held and (self._read() or {}).get("pid") == self._record["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False
