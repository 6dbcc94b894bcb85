"""The per-pass admission budget: free slots, free KV blocks and the offline reserve."""

from __future__ import annotations

from server.executor.base import Capacity
from server.scheduler.live import LiveRequest
from server.scheduler.types import Tier


class PassBudget:
    """What one scheduling pass may still hand out.

    Invariant: ``free_slots`` and ``free_blocks`` never go negative, and an online admission
    never eats into the slots kept for offline: after it, free slots still cover
    ``keep_offline - offline_holding`` (the part of the reserve offline does not hold yet).
    KV admission is optimistic about evictable cached blocks (they count as free) and
    pessimistic about growth (a sequence is charged for its context plus one token).
    """

    def __init__(
        self,
        capacity: Capacity,
        *,
        free_slots: int,
        free_blocks: int,
        reserve: int,
        offline_demand: int,
        offline_holding: int,
    ) -> None:
        self._capacity = capacity
        self.free_slots = max(0, free_slots)
        self.free_blocks = max(0, free_blocks)
        self.reserve = reserve  # slots kept for offline when it has that much demand
        self.offline_demand = offline_demand  # offline running + queued
        self.offline_holding = offline_holding  # offline slots held now, admissions included
        # Offline slots the executor may hold at most (the TPOT budget, for executors that
        # plan their own steps); None: no bound beyond the slots.
        self.offline_limit: int | None = None

    def blocks_needed(self, seq: LiveRequest) -> int:
        """KV blocks a (re)started run needs: its context plus the first new token."""
        return self._capacity.blocks_for(seq.num_context_tokens + 1)

    def blocks_held(self, seq: LiveRequest) -> int:
        """KV blocks a running sequence is estimated to hold (what preempting it frees)."""
        return self._capacity.blocks_for(seq.num_context_tokens)

    @property
    def keep_offline(self) -> int:
        """Slots offline is entitled to: min(reserve, offline demand)."""
        return min(self.reserve, self.offline_demand)

    @property
    def reserved_slots(self) -> int:
        """Free slots that only offline may take in this pass."""
        return max(0, self.keep_offline - self.offline_holding)

    def slot_for(self, tier: Tier) -> bool:
        if tier is Tier.ONLINE:
            return self.free_slots - self.reserved_slots >= 1
        if self.offline_limit is not None and self.offline_holding >= self.offline_limit:
            return False
        return self.free_slots >= 1

    def fits(self, seq: LiveRequest) -> bool:
        return self.slot_for(seq.tier) and self.blocks_needed(seq) <= self.free_blocks

    def try_admit(self, seq: LiveRequest) -> bool:
        """Takes a slot and the blocks for seq if they are there."""
        if not self.fits(seq):
            return False
        self.free_slots -= 1
        self.free_blocks -= self.blocks_needed(seq)
        if seq.tier is Tier.OFFLINE:
            self.offline_holding += 1
        return True

    def refund(self, seq: LiveRequest) -> None:
        """Gives back what try_admit took: the executor refused seq, which is now gone, so
        offline demand (and with it the reserve offline may claim) shrinks."""
        self.free_slots += 1
        self.free_blocks += self.blocks_needed(seq)
        if seq.tier is Tier.OFFLINE:
            self.offline_holding -= 1
            self.offline_demand -= 1

    def release(self, seq: LiveRequest) -> None:
        """Credits the slot and blocks of a running sequence that was just preempted."""
        self.free_slots += 1
        self.free_blocks += self.blocks_held(seq)
        if seq.tier is Tier.OFFLINE:
            self.offline_holding -= 1
