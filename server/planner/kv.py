"""The simulated engine's KV-cache pool: paged blocks counted, not stored, with a prefix cache.

A running sequence holds ``blocks_for(its tokens)`` blocks of its own. When it ends (finish,
cancel, preemption), each full block it computed is kept as *cached*, named by a chained hash of
the tokens up to the end of that block, and evicted least recently used first when fresh blocks
run out. A sequence admitted later whose leading full blocks carry the same names takes them
back instead of computing them again: that is how a preempted sequence resumes cheaply (its
context is its prompt plus the tokens it produced, whose blocks it left behind), and how prompts
that share a prefix with an earlier one find it.

Simplification against the real block manager (server/executor/kv/blocks.py): blocks of
*running* sequences are private, so two sequences running at once with the same prefix each
compute and hold their own copy. Replayed traces carry no prompt contents, so nothing shares a
prefix there but a resumed sequence and its earlier run, which never run at the same time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class SimKvPool:
    """Free, used and cached block counts. Invariant: used + cached <= num_blocks."""

    def __init__(self, num_blocks: int, tokens_per_block: int) -> None:
        if num_blocks < 1 or tokens_per_block < 1:
            raise ValueError("num_blocks and tokens_per_block must be >= 1")
        self.num_blocks = num_blocks
        self.tokens_per_block = tokens_per_block
        self.used = 0
        self._cached: OrderedDict[int, None] = OrderedDict()  # block name -> None, LRU first

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.used - len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_block)

    def can_take(self, n: int) -> bool:
        """Whether n fresh blocks can be had (evicting cached ones)."""
        return n <= self.num_blocks - self.used

    def take(self, n: int) -> bool:
        """Marks n fresh blocks used, evicting cached ones LRU first; False (nothing taken)
        when even eviction would not make room."""
        if not self.can_take(n):
            return False
        while self.num_free < n:
            self._cached.popitem(last=False)
        self.used += n
        return True

    def admit(self, tokens: Sequence[int], blocks: int) -> int | None:
        """Takes ``blocks`` blocks for a sequence whose context is ``tokens``, reusing its
        cached leading full blocks (the last token is always left to compute); returns the
        cached tokens, or None (nothing taken) when the pool cannot hold it now."""
        names = self._leading_names(tokens)
        hits = 0
        for name in names:
            if name not in self._cached:
                break
            hits += 1
        if blocks - hits > self.num_blocks - self.used - hits:
            return None
        for name in names[:hits]:
            del self._cached[name]
        self.used += hits
        if not self.take(blocks - hits):  # cannot fail after the check above
            raise AssertionError("KV pool accounting broken")
        return hits * self.tokens_per_block

    def release(self, blocks: int, tokens: Sequence[int], num_computed: int) -> None:
        """Gives back a sequence's blocks; its full computed blocks stay cached for reuse."""
        self.used -= blocks
        tpb = self.tokens_per_block
        full = min(num_computed // tpb, blocks)
        name = 0
        for i in range(full):
            name = hash((name, tuple(tokens[i * tpb : (i + 1) * tpb])))
            self._cached[name] = None  # a name cached already stays one block
            self._cached.move_to_end(name)

    def _leading_names(self, tokens: Sequence[int]) -> list[int]:
        """Names of the leading full blocks that a prefix hit may cover; stops at the first
        that is not cached (every later name chains through it)."""
        tpb = self.tokens_per_block
        names: list[int] = []
        name = 0
        for i in range((len(tokens) - 1) // tpb):
            name = hash((name, tuple(tokens[i * tpb : (i + 1) * tpb])))
            if name not in self._cached:
                break
            names.append(name)
        return names

    def check_integrity(self) -> None:
        if not 0 <= self.used <= self.num_blocks - len(self._cached):
            raise AssertionError(
                f"KV pool: {self.used} used + {len(self._cached)} cached > {self.num_blocks}"
            )
