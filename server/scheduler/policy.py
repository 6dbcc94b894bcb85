"""Scheduling policy in one place: tier ordering keys, wait queues, executor priorities.

- ONLINE waits in earliest-deadline-first order (no deadline sorts last), then arrival, then id.
- OFFLINE waits in FIFO order, except that a preempted sequence goes back to the head, so it
  resumes first and finds its prefix still in the cache.
- ``fcfs`` (the benchmark baseline) puts both tiers in one FIFO queue in arrival order.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from server.scheduler.config import SchedulerConfig
from server.scheduler.live import LiveRequest
from server.scheduler.types import Tier

OrderKey = tuple[float, float, int]


def online_key(seq: LiveRequest) -> OrderKey:
    """Earliest TTFT deadline first (none sorts last), then arrival, then id."""
    deadline = seq.request.ttft_deadline
    return (math.inf if deadline is None else deadline, seq.arrival, seq.id)


def exec_priority(config: SchedulerConfig, tier: Tier) -> float:
    """Priority passed to engines that order their own queue (higher first); equal in fcfs."""
    if config.policy == "fcfs":
        return 0.5
    return 1.0 if tier is Tier.ONLINE else 0.0


def overtakes(config: SchedulerConfig, tier: Tier) -> bool:
    """Whether a request's prefill may overtake the engine's step in flight: online work under
    backfill, so that its first token waits for no offline step."""
    return config.policy == "backfill" and tier is Tier.ONLINE


class WaitQueue(Protocol):
    """Requests waiting for a slot, iterated in admission order."""

    def push(self, seq: LiveRequest) -> None: ...

    def push_front(self, seq: LiveRequest) -> None:
        """Puts a preempted sequence where it is admitted next (FIFO queues only)."""

    def remove(self, seq: LiveRequest) -> None: ...

    def peek(self) -> LiveRequest | None: ...

    def __iter__(self) -> Iterator[LiveRequest]: ...

    def __len__(self) -> int: ...


class FifoQueue:
    """Arrival order with O(1) push at either end and O(1) removal from the middle (cancels
    and deadline drops hit arbitrary entries of a queue that may hold 100k requests)."""

    def __init__(self) -> None:
        self._items: OrderedDict[int, LiveRequest] = OrderedDict()

    def push(self, seq: LiveRequest) -> None:
        self._items[seq.id] = seq

    def push_front(self, seq: LiveRequest) -> None:
        self._items[seq.id] = seq
        self._items.move_to_end(seq.id, last=False)

    def remove(self, seq: LiveRequest) -> None:
        del self._items[seq.id]

    def peek(self) -> LiveRequest | None:
        return next(iter(self._items.values()), None)

    def __iter__(self) -> Iterator[LiveRequest]:
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)


class DeadlineQueue:
    """Kept sorted by ``online_key``; keys are unique because they end with the id."""

    def __init__(self) -> None:
        self._keys: list[OrderKey] = []
        self._items: dict[int, LiveRequest] = {}

    def push(self, seq: LiveRequest) -> None:
        bisect.insort(self._keys, online_key(seq))
        self._items[seq.id] = seq

    def push_front(self, seq: LiveRequest) -> None:
        self.push(seq)  # the deadline order decides, even for a preempted sequence

    def remove(self, seq: LiveRequest) -> None:
        key = online_key(seq)
        del self._keys[bisect.bisect_left(self._keys, key)]
        del self._items[seq.id]

    def peek(self) -> LiveRequest | None:
        return self._items[self._keys[0][2]] if self._keys else None

    def __iter__(self) -> Iterator[LiveRequest]:
        return iter([self._items[key[2]] for key in self._keys])

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, slots=True)
class TierQueues:
    """The wait queue of each tier; in fcfs both names point at one shared FIFO queue."""

    online: WaitQueue
    offline: WaitQueue

    @classmethod
    def for_config(cls, config: SchedulerConfig) -> TierQueues:
        if config.policy == "fcfs":
            shared = FifoQueue()
            return cls(online=shared, offline=shared)
        return cls(online=DeadlineQueue(), offline=FifoQueue())

    def of(self, tier: Tier) -> WaitQueue:
        return self.online if tier is Tier.ONLINE else self.offline
