"""Scheduling policy in one place: tier ordering keys, wait queues, executor priorities.

- ONLINE waits in earliest-deadline-first order (no deadline sorts last), then arrival, then id.
- OFFLINE is shared fairly between tenants (weighted fair queueing, ``FairQueue``): each
  tenant's requests in arrival order, tenants taking turns in proportion to their weights.
  A preempted sequence goes back to the head, so it resumes first and finds its prefix still
  in the cache.
- ``fcfs`` (the benchmark baseline) puts both tiers in one FIFO queue in arrival order.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
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

    def remove(self, seq: LiveRequest) -> None:
        """Removes a request that leaves without running (cancel, deadline, shutdown)."""

    def take(self, seq: LiveRequest) -> None:
        """Removes a request as it starts running (a fair queue charges its tenant here)."""

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

    take = remove

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

    take = remove

    def peek(self) -> LiveRequest | None:
        return self._items[self._keys[0][2]] if self._keys else None

    def __iter__(self) -> Iterator[LiveRequest]:
        return iter([self._items[key[2]] for key in self._keys])

    def __len__(self) -> int:
        return len(self._items)


def request_cost(seq: LiveRequest) -> int:
    """What admitting a request costs its tenant in fair queueing: its token budget (prompt
    plus max_tokens), known at admission, so a tenant of long requests gets fewer of them."""
    request = seq.request
    return len(request.prompt_token_ids) + request.sampling.max_tokens


@dataclass(slots=True, eq=False)
class _TenantLine:
    """One tenant's waiting requests (arrival order) and the service charged to it."""

    name: str
    waiting: OrderedDict[int, LiveRequest] = field(default_factory=OrderedDict)
    vtime: float = 0.0  # virtual time: cost / weight of every admission so far

    def head(self) -> LiveRequest:
        return next(iter(self.waiting.values()))


class FairQueue:
    """Weighted fair queueing between tenants (start-time fair queueing, with a request's
    token budget as its size).

    Every tenant has a virtual time, advanced by cost / weight each time one of its requests
    is admitted (``take``); the next request is the head of the tenant with work waiting
    whose virtual time is least (ties: the earlier head). A tenant that had nothing waiting
    joins at the current virtual time (that of the last admission), so idle time banks no
    credit and a newcomer is not penalized for others' history. So over any stretch where
    tenants have work waiting, the service each receives, over its weight, stays within one
    request's cost of any other's: a 10-request job waits for about 10 turns, not behind a
    100k-request backlog queued before it. Preempted sequences (``push_front``) go before
    everything, uncharged: they were charged when first admitted.

    peek/push/take/remove are O(log tenants) amortized: a heap of (virtual time, head
    arrival, head id, tenant) with stale entries skipped when they surface.
    """

    def __init__(self) -> None:
        self._resumed: OrderedDict[int, LiveRequest] = OrderedDict()
        self._lines: dict[str, _TenantLine] = {}
        self._heap: list[tuple[float, float, int, str]] = []
        self._virtual = 0.0  # the virtual time at which the last admitted request started
        self._len = 0

    def push(self, seq: LiveRequest) -> None:
        name = seq.request.tenant
        line = self._lines.get(name)
        if line is None:
            line = self._lines[name] = _TenantLine(name, vtime=self._virtual)
        if not line.waiting:
            line.vtime = max(line.vtime, self._virtual)
        line.waiting[seq.id] = seq
        if len(line.waiting) == 1:
            self._push_line(line)
        self._len += 1

    def push_front(self, seq: LiveRequest) -> None:
        self._resumed[seq.id] = seq
        self._resumed.move_to_end(seq.id, last=False)
        self._len += 1

    def remove(self, seq: LiveRequest) -> None:
        self._len -= 1
        if self._resumed.pop(seq.id, None) is not None:
            return
        line = self._lines[seq.request.tenant]
        was_head = next(iter(line.waiting)) == seq.id
        del line.waiting[seq.id]
        if was_head:
            self._line_changed(line)

    def take(self, seq: LiveRequest) -> None:
        self._len -= 1
        if self._resumed.pop(seq.id, None) is not None:
            return
        line = self._lines[seq.request.tenant]
        del line.waiting[seq.id]
        self._virtual = max(self._virtual, line.vtime)
        line.vtime += request_cost(seq) / seq.request.weight
        self._line_changed(line)

    def peek(self) -> LiveRequest | None:
        if self._resumed:
            return next(iter(self._resumed.values()))
        line = self._top()
        return None if line is None else line.head()

    def __iter__(self) -> Iterator[LiveRequest]:
        """Admission order if nothing else arrived or left (a simulation of ``take``)."""
        out = list(self._resumed.values())
        heap = [(line.vtime, line.head().arrival, line.head().id, line.name)
                for line in self._lines.values() if line.waiting]
        heapq.heapify(heap)
        rest = {name: list(line.waiting.values()) for name, line in self._lines.items()}
        taken = dict.fromkeys(rest, 0)
        while heap:
            vtime, _, _, name = heapq.heappop(heap)
            seq = rest[name][taken[name]]
            taken[name] += 1
            out.append(seq)
            if taken[name] < len(rest[name]):
                nxt = rest[name][taken[name]]
                vtime += request_cost(seq) / seq.request.weight
                heapq.heappush(heap, (vtime, nxt.arrival, nxt.id, name))
        return iter(out)

    def __len__(self) -> int:
        return self._len

    def _push_line(self, line: _TenantLine) -> None:
        head = line.head()
        heapq.heappush(self._heap, (line.vtime, head.arrival, head.id, line.name))

    def _line_changed(self, line: _TenantLine) -> None:
        """Its head or its virtual time changed: the heap entry it had is stale now."""
        if line.waiting:
            self._push_line(line)
        elif line.vtime <= self._virtual:
            del self._lines[line.name]  # it would rejoin at the current virtual time anyway
        if len(self._heap) > 64 + 2 * len(self._lines):
            self._compact()

    def _top(self) -> _TenantLine | None:
        heap = self._heap
        while heap:
            vtime, _, head_id, name = heap[0]
            line = self._lines.get(name)
            if line is not None and line.waiting and line.vtime == vtime and (
                next(iter(line.waiting)) == head_id
            ):
                return line
            heapq.heappop(heap)
        return None

    def _compact(self) -> None:
        """Drops stale heap entries and idle tenants that owe nothing (bounded memory)."""
        for name in [n for n, line in self._lines.items()
                     if not line.waiting and line.vtime <= self._virtual]:
            del self._lines[name]
        self._heap = []
        for line in self._lines.values():
            if line.waiting:
                self._push_line(line)


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
        return cls(online=DeadlineQueue(), offline=FairQueue())

    def of(self, tier: Tier) -> WaitQueue:
        return self.online if tier is Tier.ONLINE else self.offline
