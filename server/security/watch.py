"""Reloading files without a restart: a task that looks at some files every few seconds and,
when any of them changed, calls a reload function on a worker thread. A reload that fails
(a half-written or invalid file) is logged and the old contents stay in force; the next change
is tried again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int] | None, ...]


def signature(paths: Sequence[Path]) -> Signature:
    """What identifies the files' current contents cheaply: (mtime, size, inode) each (None
    for a missing file). Replacing a file (as certificate managers and ``save_keys`` do)
    changes the inode even within one mtime tick."""
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class FileWatcher:
    """Calls ``reload()`` (on a worker thread) after any of ``paths`` changes."""

    def __init__(self, name: str, paths: Sequence[Path], reload: Callable[[], None],
                 interval_s: float) -> None:
        self._name = name
        self._paths = list(paths)
        self._reload = reload
        self._interval_s = interval_s
        self._seen = signature(self._paths)
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0  # successful reloads since start

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check(self) -> bool:
        """Reloads if the files changed since the last look; True when it reloaded."""
        now = signature(self._paths)
        if now == self._seen:
            return False
        self._seen = now
        try:
            await asyncio.to_thread(self._reload)
        except Exception as exc:
            log.error("%s: reload failed, the previous version stays in force: %s",
                      self._name, exc)
            return False
        self.reloads += 1
        log.info("%s: reloaded", self._name)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.check()
