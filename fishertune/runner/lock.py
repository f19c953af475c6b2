"""One lock per cell, so that runners sharing a results directory never compute a cell twice at once.

The lock is an advisory ``flock`` on ``<results>/<name>/locks/<cell id>.lock``, taken without waiting:
a runner that cannot take it leaves the cell to its holder and goes on with the next one. The kernel
drops the lock when its holder dies (killed, pre-empted, out of memory), so a dead runner never keeps
a cell. The file records who holds it (host, process, start time) for ``fishertune status``; a heartbeat
refreshes its modification time while the cell runs. Shared file systems: ``flock`` works across
machines on NFSv4, and on Lustre when mounted with ``-o flock``; where it does not, runners on
different machines must not share a results directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from fishertune.errors import UserError

HEARTBEAT_S = 60.0


class CellLock:
    """``acquire()`` -> True when this process now holds the cell; ``release()`` gives it back."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> bool:
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except (FileNotFoundError, FileExistsError):  # the folder was just removed by a runner releasing
                continue  # the last lock (FileExistsError: mkdir saw it made, then gone before its check)
            except OSError as e:
                raise UserError(f"cannot create the lock file {self.path} ({e.strerror}); pass a writable "
                                "--results DIR") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # the file may have been removed (and recreated) by the previous holder between our open and lock
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            self.path.unlink(missing_ok=True)  # removed while still held: the next taker checks the inode
            with contextlib.suppress(OSError):  # the folder too once empty (a taker makes it again)
                self.path.parent.rmdir()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(path: Path) -> dict[str, Any] | None:
    """Who holds the lock at ``path`` (host, pid, started, heartbeat), or None when nobody does."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except json.JSONDecodeError:
                info = {}
            info["heartbeat"] = os.fstat(fd).st_mtime
            return info
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # a file left behind by a holder that died: nobody holds it
    finally:
        os.close(fd)
