"""Threads and queues shared by the TensorRT-LLM adapters.

``ResponsePump`` is the one thread per bindings executor that calls ``await_responses``: the
bindings deliver each response once, to whichever caller asks first, so a second reader would
steal responses. ``Outbox`` is where finished ``TokenDelta``s wait for ``poll``.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from server.executor.base import TokenDelta

log = logging.getLogger(__name__)


class Outbox:
    """Deltas ready for ``poll``; ``take`` waits up to timeout for at least one."""

    def __init__(self) -> None:
        self._ready: deque[TokenDelta] = deque()
        self._cond = threading.Condition()

    def put(self, *deltas: TokenDelta) -> None:
        with self._cond:
            self._ready.extend(deltas)
            self._cond.notify_all()

    def take(self, timeout: float) -> list[TokenDelta]:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while not self._ready:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            out = list(self._ready)
            self._ready.clear()
            return out


class ResponsePump:
    """Calls ``engine.await_responses(timeout)`` in a loop and hands batches to ``handle``.

    ``on_tick`` runs after every wait (responses or not): the adapters absorb iteration
    stats there, so they are read even when nobody calls ``stats()``.
    """

    def __init__(self, engine: Any, handle: Callable[[list[Any]], None],
                 on_tick: Callable[[], None], *, timeout_s: float, name: str) -> None:
        self._engine: Any = engine
        self._handle = handle
        self._on_tick = on_tick
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread and drops the engine: the caller may then destroy it (the bindings
        free the KV pool only when the executor object goes away)."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        self._engine = None

    def _run(self) -> None:
        engine = self._engine
        while not self._stop.is_set():
            try:
                responses = engine.await_responses(self._timeout)
            except Exception:  # the engine is gone (shutdown) or broken: nothing more comes
                if not self._stop.is_set():
                    log.exception("await_responses failed; the response thread stops")
                return
            try:
                if responses:
                    self._handle(list(responses))
                self._on_tick()
            except Exception:  # a bug in a handler must not silently stop every stream
                log.exception("handling TensorRT-LLM responses failed")
