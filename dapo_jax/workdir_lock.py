"""One workdir, one writer: a run creates `<dir>/.lock` before it writes anything and removes it when
it ends, so a second run started into the same directory stops with an error naming the first.

    <dir>/.lock    {"host": ..., "pid": ..., "proc_start": ..., "started": "2026-11-30T13:00:00+00:00",
                    "command": "python -m dapo_jax.train ..."}

The file is created atomically: O_CREAT|O_EXCL on a local disk; for a URI (gs://bucket/dir) through
fsspec's pipe_file(mode="create"), which gcsfs sends as an upload with the precondition
ifGenerationMatch=0 (atomic); other fsspec backends check for the file and then write it, which is
not atomic.

A lock whose run died without removing it (kill -9, an out-of-memory kill) is stale. On the host that
took it, the lock is reclaimed when its pid no longer runs, or now belongs to another process (pid
reuse: the start time of the process, `proc_start` from /proc/<pid>/stat, differs). From another host
that cannot be checked, so the run refuses and names the file to delete. As only the lock's own host
reclaims, a flock on a file in the host's temporary directory serializes the reclaimers: of two runs
reclaiming one stale lock, one removes it and takes the directory, the other finds the winner's live
lock.

Jax-free on purpose: only process 0 of a multi-host run takes the lock (the caller decides), and
tests take it in child processes that start in milliseconds.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class WorkdirInUse(RuntimeError):
    """Another run holds the directory's lock, or may: from another host its liveness is unknown."""


class Lock:
    """The lock of `directory` (a local path, or a URI such as gs://bucket/dir, also as an etils
    epath); `what` names it in messages: "workdir" or "checkpoint.dir".

        with Lock(workdir, "workdir"):
            ...  # the run

    A process holding a directory's lock cannot take it a second time (it finds its own live lock).
    """

    def __init__(self, directory, what: str = "workdir"):
        self.directory, self.what = os.fspath(directory), what
        self._file = _RemoteFile(self.directory) if "://" in self.directory else _LocalFile(self.directory)
        self._held: bytes | None = None

    def acquire(self) -> None:
        record = json.dumps(_record(), indent=1).encode()
        unreadable = 0
        while not self._file.create(record):
            held = self._file.read()
            if held is None:
                continue  # released since our attempt: try again
            owner = _parse(held)
            if owner is None:
                # A local lock is created empty and then written: read it again a moment later.
                unreadable += 1
                if unreadable < 5:
                    time.sleep(0.2)
                    continue
                raise WorkdirInUse(f"{self.what} {self.directory} has a lock file that holds no run's record: "
                                   f"{self._file.name}; if no run is using {self.directory}, delete it and start again")
            self._refuse_or_reclaim(held, owner)
        self._held = record

    def release(self) -> None:
        """Removes the lock if it is still this run's (idempotent)."""
        if self._held is not None and self._file.read() == self._held:
            self._file.remove()
        self._held = None

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _refuse_or_reclaim(self, held: bytes, owner: dict) -> None:
        run = f"pid {owner['pid']} on host {owner['host']} since {owner['started']} ({owner['command']})"
        remedy = f"wait for it to finish or use another {'--workdir' if self.what == 'workdir' else self.what}"
        if owner["host"] != socket.gethostname():
            raise WorkdirInUse(
                f"{self.what} {self.directory} is in use by {run}, or was: from host {socket.gethostname()} it cannot "
                f"be checked whether that run still runs. If it does not, delete {self._file.name} and start "
                f"again; otherwise {remedy}")
        if _alive(owner["pid"], owner.get("proc_start")):
            raise WorkdirInUse(f"{self.what} {self.directory} is in use by {run}; {remedy}")
        with _reclaim_mutex():
            if self._file.read() == held:  # no other reclaimer removed it (and then took the directory)
                log.warning(f"{self.what} {self.directory}: reclaiming the stale lock of pid {owner['pid']} on host "
                            f"{owner['host']} (started {owner['started']}: {owner['command']}), which is no longer "
                            "running")
                self._file.remove()


def _record() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "proc_start": _proc_start(pid),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(sys.orig_argv)}


def _parse(held: bytes) -> dict | None:
    try:
        owner = json.loads(held)
    except ValueError:
        return None
    return owner if isinstance(owner, dict) and {"host", "pid", "started", "command"} <= owner.keys() else None


def _proc_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None
    without /proc or without the process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2, the command name in parentheses, may hold spaces: count the fields after its ')'.
    return int(stat.rpartition(")")[2].split()[19])


def _alive(pid: int, proc_start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process, and running
    return proc_start is None or _proc_start(pid) == proc_start


@contextlib.contextmanager
def _reclaim_mutex():
    """Excludes this user's other reclaims on this host (they are rare and short); the kernel lets go
    when its holder dies. Its file stays: removing it would let two holders in at once."""
    fd = os.open(Path(tempfile.gettempdir()) / f"dapo_jax-lock-reclaim-{os.getuid()}", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class _LocalFile:
    def __init__(self, directory: str):
        self.directory = Path(directory).absolute()
        self.name = str(self.directory / LOCK_FILE)

    def create(self, data: bytes) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def read(self) -> bytes | None:
        try:
            return Path(self.name).read_bytes()
        except FileNotFoundError:
            return None

    def remove(self) -> None:
        Path(self.name).unlink(missing_ok=True)


class _RemoteFile:
    def __init__(self, uri: str):
        import fsspec

        self.name = uri.rstrip("/") + "/" + LOCK_FILE
        self.fs, self.path = fsspec.core.url_to_fs(self.name)

    def create(self, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def read(self) -> bytes | None:
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)
