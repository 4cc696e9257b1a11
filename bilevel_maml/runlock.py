"""One process at a time per run folder: a second ``train``/``resume`` on a folder that a live
process is using would interleave checkpoints of two different runs."""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path


class RunFolderInUse(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    """``<run folder>/.lock`` holding the owner's process id and host, taken with an exclusive
    create; a lock whose process is gone (on this host) is taken over with a warning.

    :param folder: the run folder.
    """

    def __init__(self, folder):
        self.path = Path(folder) / ".lock"
        self.held = False

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                pid, host = owner.get("pid"), owner.get("host")
                if host not in (None, me["host"]):
                    raise RunFolderInUse(f"{self.path.parent} is locked by process {pid} on host {host} "
                                         f"({self.path}); if that run has ended, delete the lock file") from None
                if isinstance(pid, int) and _alive(pid):
                    raise RunFolderInUse(f"{self.path.parent} is in use by process {pid} ({self.path}); "
                                         f"wait for it to end or stop it first") from None
                warnings.warn(f"taking over the lock on {self.path.parent} left by process {pid}, "
                              f"which is no longer running", stacklevel=2)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise RunFolderInUse(f"could not take the lock {self.path}: another process keeps taking it")

    def release(self) -> None:
        if self.held and self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


__all__ = ["RunLock", "RunFolderInUse"]
