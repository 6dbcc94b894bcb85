"""Paged KV-cache bookkeeping: a pool of fixed-size blocks, per-sequence block tables, prefix
caching by chained block hashes (``prefix.py``) and LRU eviction.

No tensors live here: ``paged.PagedKvCache`` holds the values, indexed with
``block_table(seq_id)``.

Every block is in exactly one of three states:

- free: referenced by no sequence, holding nothing reusable;
- cached: referenced by no sequence, but registered under the hash of the computed prefix it
  holds; kept for reuse and evicted least recently used first, lazily, only when a fresh block
  is needed and none is free;
- used: referenced by at least one live sequence (never evicted).

Only full blocks whose K/V the executor reported computed (``mark_computed``) are registered,
so a prefix hit never hands out K/V that nobody wrote.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from server.executor.kv.prefix import BlockHash, hash_block


class NoFreeBlocksError(RuntimeError):
    """Not enough free or evictable blocks; the manager's state is unchanged."""


@dataclass(slots=True)
class _Block:
    """One physical block. ``block_hash`` is set iff the prefix cache maps it to this block."""

    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    parent_hash: BlockHash | None = None  # kept to re-derive block_hash in check_integrity
    token_ids: tuple[int, ...] = ()  # stored only while registered, to confirm hits


@dataclass(slots=True)
class _Allocation:
    """What one sequence holds. ``block_table[i]`` holds tokens ``[i*tpb, (i+1)*tpb)``."""

    token_ids: list[int]
    block_table: list[int]
    num_computed: int
    # Leading full computed blocks already offered to the prefix cache, and the hash of the
    # last of them (the parent of the next one); lets mark_computed hash each block once.
    num_hashed_blocks: int
    last_hash: BlockHash | None


class BlockManager:
    """Allocates KV blocks to sequences and shares computed prefixes between them.

    Not thread-safe: one executor loop owns it.
    """

    def __init__(self, num_blocks: int, tokens_per_block: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if tokens_per_block < 1:
            raise ValueError(f"tokens_per_block must be >= 1, got {tokens_per_block}")
        self._tokens_per_block = tokens_per_block
        self._blocks = [_Block(block_id) for block_id in range(num_blocks)]
        # A deque: O(1) take and return; free blocks are interchangeable, so order is free.
        self._free: deque[int] = deque(range(num_blocks))
        # OrderedDict as the LRU of cached blocks: O(1) append at the most recently used end,
        # O(1) pop from the least recently used end, and O(1) removal from the middle when a
        # prompt revives a cached block.
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[BlockHash, int] = {}
        self._seqs: dict[int, _Allocation] = {}

    # -- counts ---------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def tokens_per_block(self) -> int:
        return self._tokens_per_block

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free) - len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self._tokens_per_block)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a prompt of num_tokens fits even with no prefix hit."""
        return self.blocks_needed(num_tokens) <= len(self._free) + len(self._cached)

    # -- sequences ------------------------------------------------------------------------

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def num_tokens(self, seq_id: int) -> int:
        return len(self._seq(seq_id).token_ids)

    def num_computed(self, seq_id: int) -> int:
        return self._seq(seq_id).num_computed

    def block_table(self, seq_id: int) -> list[int]:
        """Physical block ids in token order (a copy)."""
        return list(self._seq(seq_id).block_table)

    def allocate(self, seq_id: int, token_ids: list[int], *, reuse: bool = True) -> int:
        """Reserves blocks for the prompt and returns how many leading tokens are cached.

        Reuses the longest chain of registered blocks matching the prompt's leading full
        blocks, but at most ``(len - 1) // tokens_per_block`` of them: the last prompt token is
        always left to compute, since its logits are what sampling needs. The result is a
        multiple of tokens_per_block and the sequence's computed count starts there. With
        ``reuse`` False nothing is reused (a prompt whose every position must be computed);
        its blocks are still offered to the cache once computed.
        Raises NoFreeBlocksError (state unchanged) or ValueError (duplicate id, empty prompt).
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already allocated")
        if len(token_ids) == 0:
            raise ValueError("cannot allocate an empty prompt")
        tokens = list(token_ids)
        max_hits = (len(tokens) - 1) // self._tokens_per_block if reuse else 0
        hits, last_hash = self._find_prefix(tokens, max_hits)
        num_fresh = self.blocks_needed(len(tokens)) - len(hits)
        num_revived = sum(1 for block_id in hits if block_id in self._cached)
        if num_fresh > len(self._free) + len(self._cached) - num_revived:
            raise NoFreeBlocksError(
                f"sequence {seq_id} needs {num_fresh} fresh blocks; "
                f"{len(self._free)} free, {len(self._cached) - num_revived} evictable"
            )
        # Revive hits before taking fresh blocks, so the eviction below cannot take them.
        for block_id in hits:
            self._acquire(block_id)
        table = hits + [self._take_fresh_block() for _ in range(num_fresh)]
        num_cached = len(hits) * self._tokens_per_block
        self._seqs[seq_id] = _Allocation(tokens, table, num_cached, len(hits), last_hash)
        return num_cached

    def can_append(self, seq_id: int) -> bool:
        """Whether one more token fits (a new block when the last one is full)."""
        return not self._needs_block(self._seq(seq_id)) or bool(self._free or self._cached)

    def append_token(self, seq_id: int, token_id: int) -> None:
        """Adds one token (a sampled output), taking a new block when the last one is full.
        Raises NoFreeBlocksError (state unchanged)."""
        seq = self._seq(seq_id)
        if self._needs_block(seq):
            if not (self._free or self._cached):
                raise NoFreeBlocksError(f"no block to append to sequence {seq_id}")
            seq.block_table.append(self._take_fresh_block())
        seq.token_ids.append(token_id)

    def mark_computed(self, seq_id: int, num_computed_tokens: int) -> None:
        """Records that K/V exists for the first num_computed_tokens tokens.

        Every block that is now full and computed is registered under its chained hash. When
        another block already holds that prefix (two sequences computed it at once), that one
        stays canonical and this sequence's copy stays private, to be freed normally.
        """
        seq = self._seq(seq_id)
        if not seq.num_computed <= num_computed_tokens <= len(seq.token_ids):
            raise ValueError(
                f"sequence {seq_id}: computed count must stay in "
                f"[{seq.num_computed}, {len(seq.token_ids)}], got {num_computed_tokens}"
            )
        seq.num_computed = num_computed_tokens
        self._register_computed_blocks(seq)

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Keeps the sequence's first num_tokens tokens, releasing the blocks past them.

        What goes are tokens never marked computed (speculative decoding: drafted tokens the
        target rejected), so num_tokens may not drop below the computed count. Registered
        blocks hold computed tokens only, all before num_tokens, so none is ever released
        here; a released block another sequence also holds stays with it.
        Raises ValueError (state unchanged) or KeyError (unknown id).
        """
        seq = self._seq(seq_id)
        if not seq.num_computed <= num_tokens <= len(seq.token_ids):
            raise ValueError(
                f"sequence {seq_id}: can keep [{seq.num_computed}, {len(seq.token_ids)}] "
                f"tokens (computed ones stay), got {num_tokens}"
            )
        keep = self.blocks_needed(num_tokens)
        for block_id in reversed(seq.block_table[keep:]):
            self._release(block_id)
        del seq.block_table[keep:]
        del seq.token_ids[num_tokens:]

    def free(self, seq_id: int) -> None:
        """Drops the sequence's references. Blocks no longer referenced become cached when
        registered (most recently used end) and free otherwise. Unknown id: KeyError."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id}")
        # Tail first, so a prefix's head lands at the most recently used end: eviction then
        # takes tails first, and a head (needed to reach anything after it) survives longest.
        for block_id in reversed(seq.block_table):
            self._release(block_id)

    def check_integrity(self) -> None:
        """Raises AssertionError naming the first broken invariant. O(blocks + tokens)."""
        free, cached = set(self._free), set(self._cached)
        used = {b.block_id for b in self._blocks if b.ref_count > 0}
        _require(len(free) == len(self._free), "a block is on the free list twice")
        _require(not free & cached, "a block is both free and cached")
        _require(not (free | cached) & used, "a referenced block is free or cached")
        _require(len(free | cached | used) == self.num_blocks, "a block is in no state")
        refs = [0] * self.num_blocks
        contents: dict[int, list[int]] = {}  # what the first holder of each block wrote there
        tpb = self._tokens_per_block
        for seq_id, seq in self._seqs.items():
            self._check_allocation(seq_id, seq)
            for i, block_id in enumerate(seq.block_table):
                refs[block_id] += 1
                held = seq.token_ids[i * tpb : (i + 1) * tpb]
                first = contents.setdefault(block_id, held)
                _require(first == held, f"block {block_id} shared by diverged sequences")
        for block in self._blocks:
            _require(block.ref_count == refs[block.block_id], f"block {block.block_id} refcount")
            if block.block_id in free:
                _require(block.block_hash is None, f"free block {block.block_id} registered")
            if block.block_id in cached:
                _require(block.block_hash is not None, f"cached block {block.block_id} hashless")
            if block.block_hash is not None:
                owner = self._hash_to_block.get(block.block_hash)
                _require(owner == block.block_id, f"block {block.block_id} hash not mapped")
        for block_hash, block_id in self._hash_to_block.items():
            block = self._blocks[block_id]
            _require(block.block_hash == block_hash, f"hash map entry for {block_id} is stale")
            _require(len(block.token_ids) == self._tokens_per_block, "registered partial block")
            rehash = hash_block(block.parent_hash, block.token_ids)
            _require(rehash == block_hash, f"block {block_id} tokens do not match its hash")

    def _check_allocation(self, seq_id: int, seq: _Allocation) -> None:
        tpb = self._tokens_per_block
        num_tokens = len(seq.token_ids)
        _require(seq.num_computed <= num_tokens, f"sequence {seq_id} computed > tokens")
        expected = self.blocks_needed(num_tokens)
        _require(len(seq.block_table) == expected, f"sequence {seq_id} block table length")
        _require(seq.num_hashed_blocks <= seq.num_computed // tpb, f"{seq_id} hashed uncomputed")
        for i, block_id in enumerate(seq.block_table):
            block = self._blocks[block_id]
            if block.block_hash is not None:
                held = tuple(seq.token_ids[i * tpb : (i + 1) * tpb])
                _require(block.token_ids == held, f"sequence {seq_id} shares a foreign block")

    # -- internals ------------------------------------------------------------------------

    def _seq(self, seq_id: int) -> _Allocation:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id}")
        return seq

    def _find_prefix(
        self, tokens: list[int], max_blocks: int
    ) -> tuple[list[int], BlockHash | None]:
        """The registered blocks holding the prompt's leading blocks, and the last one's hash."""
        hits: list[int] = []
        last_hash: BlockHash | None = None
        tpb = self._tokens_per_block
        for i in range(max_blocks):
            block_tokens = tuple(tokens[i * tpb : (i + 1) * tpb])
            block_hash = hash_block(last_hash, block_tokens)
            block_id = self._hash_to_block.get(block_hash)
            # Confirm the tokens and the parent: a hit must never rest on a hash alone.
            if block_id is None or not self._holds(block_id, last_hash, block_tokens):
                break
            hits.append(block_id)
            last_hash = block_hash
        return hits, last_hash

    def _holds(self, block_id: int, parent: BlockHash | None, tokens: tuple[int, ...]) -> bool:
        block = self._blocks[block_id]
        return block.parent_hash == parent and block.token_ids == tokens

    def _register_computed_blocks(self, seq: _Allocation) -> None:
        tpb = self._tokens_per_block
        for i in range(seq.num_hashed_blocks, seq.num_computed // tpb):
            block_tokens = tuple(seq.token_ids[i * tpb : (i + 1) * tpb])
            block_hash = hash_block(seq.last_hash, block_tokens)
            if block_hash not in self._hash_to_block:
                block = self._blocks[seq.block_table[i]]
                block.block_hash = block_hash
                block.parent_hash = seq.last_hash
                block.token_ids = block_tokens
                self._hash_to_block[block_hash] = block.block_id
            seq.last_hash = block_hash
            seq.num_hashed_blocks = i + 1

    def _needs_block(self, seq: _Allocation) -> bool:
        return len(seq.token_ids) % self._tokens_per_block == 0

    def _acquire(self, block_id: int) -> None:
        """One more reference to a registered block, reviving it if it was cached."""
        self._cached.pop(block_id, None)
        self._blocks[block_id].ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self._blocks[block_id]
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        if block.block_hash is not None:
            self._cached[block_id] = None
            return
        self._free.append(block_id)

    def _take_fresh_block(self) -> int:
        """A free block with one reference, evicting the LRU cached block if none is free.
        Callers check availability first."""
        block_id = self._free.popleft() if self._free else self._evict_lru()
        self._blocks[block_id].ref_count = 1
        return block_id

    def _evict_lru(self) -> int:
        block_id, _ = self._cached.popitem(last=False)
        block = self._blocks[block_id]
        assert block.block_hash is not None  # cached blocks are registered
        del self._hash_to_block[block.block_hash]
        block.block_hash = None
        block.parent_hash = None
        block.token_ids = ()
        return block_id


def _require(condition: bool, invariant: str) -> None:
    # Not `assert`: integrity checks must survive python -O.
    if not condition:
        raise AssertionError(f"KV cache invariant broken: {invariant}")
