"""One run per output directory: the main process writes `run.lock` (host, pid, process start time) into
`--output_dir` and removes it at exit, also after an error or a preemption's 143/130; a lock left by a process
that is gone (same host) is taken over with one line saying so."""

import atexit
import contextlib
import json
import os
import socket
import tempfile
from pathlib import Path

import psutil  # an accelerate dependency

from hftrain.errors import UserError

LOCK_NAME = "run.lock"


def _process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None if there is none: a pid reused by another
    process has another start time."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


class RunLock:
    """`run.lock` in the output directory, held by the main process of a run (the others take none)."""

    def __init__(self, output_dir: str, is_main_process: bool = True) -> None:
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self.is_main_process = is_main_process
        self.made_dir = False
        self.held = False

    def acquire(self) -> None:
        if not self.is_main_process:
            return
        try:
            self.made_dir = not self.dir.exists()
            self.dir.mkdir(parents=True, exist_ok=True)
            # Written in full under a temporary name, then linked to run.lock: the link fails if a lock exists,
            # so a second run never reads a half-written one.
            me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_started(os.getpid())}
            fd, tmp = tempfile.mkstemp(prefix=".run.lock-", dir=self.dir)
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except OSError as e:
            raise UserError(f"cannot write to --output_dir {self.dir} ({e.strerror}); choose a folder you can write to")
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    self._take_over_if_stale()
                    continue
                self.held = True
                atexit.register(self.release)
                return
        finally:
            os.unlink(tmp)
        raise UserError(
            f"could not take the lock {self.path}: other runs keep starting in {self.dir}; choose another --output_dir"
        )

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            host, pid, started = holder["host"], int(holder["pid"]), holder.get("started")
        except FileNotFoundError:
            return  # released in between: try again
        except (OSError, ValueError, KeyError, TypeError):
            host, pid, started = None, 0, None
        if host is None:
            print(f"taking over the unreadable lock {self.path}", flush=True)
        elif host == socket.gethostname():
            now = _process_started(pid)
            if now is not None and (started is None or abs(now - float(started)) < 1.0):
                raise UserError(
                    f"{self.dir} is in use by another run (process {pid} on {host}, see {self.path}); wait for it to end, "
                    "or choose another --output_dir"
                )
            print(f"taking over the stale lock {self.path}: process {pid} on {host} is gone", flush=True)
        else:
            raise UserError(
                f"{self.dir} is in use by another run (process {pid} on {host}, see {self.path}); wait for it to end, choose "
                f"another --output_dir, or, if no run on {host} uses it any more, delete {self.path}"
            )
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(self.path.read_text())["pid"] == os.getpid():
                self.path.unlink()
        if self.made_dir:  # a folder this run made and left empty (it stopped early) goes with the lock
            with contextlib.suppress(OSError):
                self.dir.rmdir()
