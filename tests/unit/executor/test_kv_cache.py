"""BlockManager: prefix caching, LRU eviction and invariants under random operations."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from server.executor.kv import BlockManager, NoFreeBlocksError
from server.executor.kv import blocks as blocks_module
from server.executor.kv.prefix import BlockHash, hash_block

pytestmark = pytest.mark.unit

Snapshot = tuple[tuple[int, int, int], tuple[tuple[int, tuple[int, ...], int, int], ...]]


def snapshot(bm: BlockManager, seq_ids: list[int]) -> Snapshot:
    """Everything observable about the manager, to prove a failed call changed nothing."""
    seqs = tuple(
        (s, tuple(bm.block_table(s)), bm.num_tokens(s), bm.num_computed(s)) for s in seq_ids
    )
    return (bm.num_free_blocks, bm.num_cached_blocks, bm.num_used_blocks), seqs


def computed_seq(bm: BlockManager, seq_id: int, tokens: list[int]) -> int:
    """Allocates tokens as a prompt and marks all of it computed; returns the cached count."""
    cached = bm.allocate(seq_id, tokens)
    bm.mark_computed(seq_id, len(tokens))
    bm.check_integrity()
    return cached


# -- prefix hashing ---------------------------------------------------------------------------


def test_block_hash_is_chained_and_deterministic() -> None:
    first = hash_block(None, [1, 2])
    assert first == hash_block(None, (1, 2))
    assert hash_block(first, [3, 4]) != hash_block(None, [3, 4])
    assert hash_block(first, [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])
    assert hash_block(None, [1, 2]) != hash_block(None, [2, 1])


# -- rollback of uncomputed tokens ------------------------------------------------------------


def test_truncate_frees_the_trailing_blocks_of_rejected_tokens() -> None:
    bm = BlockManager(8, 4)
    bm.allocate(1, list(range(6)))
    bm.mark_computed(1, 5)
    for token in (90, 91, 92, 93, 94):  # drafted tokens: 11 tokens, 3 blocks
        bm.append_token(1, token)
    table = bm.block_table(1)
    free = bm.num_free_blocks
    bm.truncate(1, 7)  # keep two of the drafted tokens: 2 blocks
    assert bm.block_table(1) == table[:2] and bm.num_tokens(1) == 7
    assert bm.num_free_blocks == free + 1 and bm.num_cached_blocks == 0
    bm.append_token(1, 5)  # the step's own token goes where the next draft was
    assert bm.block_table(1) == table[:2]
    bm.check_integrity()


def test_truncate_never_drops_computed_tokens() -> None:
    bm = BlockManager(8, 4)
    bm.allocate(1, list(range(6)))
    bm.mark_computed(1, 5)
    with pytest.raises(ValueError, match="computed ones stay"):
        bm.truncate(1, 4)
    with pytest.raises(ValueError):
        bm.truncate(1, 7)
    with pytest.raises(KeyError):
        bm.truncate(2, 1)
    assert bm.num_tokens(1) == 6


def test_truncate_keeps_blocks_the_prefix_cache_shares() -> None:
    bm = BlockManager(8, 4)
    prompt = list(range(9))
    computed_seq(bm, 1, prompt)  # two full registered blocks
    assert bm.allocate(2, prompt) == 8  # shares them
    shared = bm.block_table(2)[:2]
    for token in (50, 51, 52, 53, 54):
        bm.append_token(2, token)
    bm.truncate(2, 9)
    assert bm.block_table(2)[:2] == shared == bm.block_table(1)[:2]
    bm.free(1)
    bm.free(2)
    assert bm.num_cached_blocks == 2  # still registered: a later prompt hits them
    assert bm.allocate(3, prompt) == 8
    bm.check_integrity()


# -- prefix hits ------------------------------------------------------------------------------


def test_prefix_hit_reuses_the_same_physical_blocks() -> None:
    bm = BlockManager(16, 4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    assert computed_seq(bm, 1, prompt) == 0
    table = bm.block_table(1)
    bm.free(1)
    assert bm.num_cached_blocks == 2 and bm.num_used_blocks == 0

    assert bm.allocate(2, [*prompt, 10, 11, 12]) == 8
    assert bm.block_table(2)[:2] == table[:2]
    assert bm.num_computed(2) == 8 and bm.num_tokens(2) == 13
    assert bm.num_cached_blocks == 0  # both revived: cached -> used
    bm.check_integrity()


def test_live_sequences_share_a_computed_prefix() -> None:
    bm = BlockManager(16, 2)
    computed_seq(bm, 1, [5, 6, 7, 8, 9])
    assert bm.allocate(2, [5, 6, 7, 8, 1]) == 4
    assert bm.block_table(2)[:2] == bm.block_table(1)[:2]
    assert bm.num_used_blocks == 4  # 3 for seq 1, one fresh last block for seq 2
    bm.free(1)
    assert bm.num_used_blocks == 3  # shared blocks stay referenced by seq 2
    bm.check_integrity()


@pytest.mark.parametrize("tokens_per_block", [1, 2, 4])
def test_never_the_whole_prompt_is_cached(tokens_per_block: int) -> None:
    bm = BlockManager(32, tokens_per_block)
    prompt = list(range(3 * tokens_per_block))  # exactly 3 full blocks
    computed_seq(bm, 1, prompt)
    bm.free(1)
    cached = bm.allocate(2, prompt)
    assert cached == 2 * tokens_per_block  # the last block is recomputed for its logits
    bm.check_integrity()


def test_uncomputed_blocks_are_never_shared() -> None:
    bm = BlockManager(16, 2)
    prompt = [1, 2, 3, 4, 5, 6, 7]
    bm.allocate(1, prompt)
    assert bm.allocate(2, prompt) == 0  # nothing computed yet
    bm.mark_computed(1, 3)  # block 0 full and computed; block 1 half computed
    assert bm.allocate(3, prompt) == 2
    assert bm.block_table(3)[0] == bm.block_table(1)[0]
    assert bm.block_table(3)[1] != bm.block_table(1)[1]
    bm.check_integrity()


def test_prompt_differing_in_a_block_hits_only_before_it() -> None:
    bm = BlockManager(16, 2)
    computed_seq(bm, 1, [1, 2, 3, 4, 5, 6, 7])
    assert bm.allocate(2, [1, 2, 3, 9, 5, 6, 7]) == 2
    # Same tokens at block 2 but a different parent: the chain must not match.
    assert bm.allocate(3, [9, 9, 3, 4, 5, 6, 7]) == 0
    bm.check_integrity()


def test_hash_collision_is_not_a_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    def colliding(parent: BlockHash | None, tokens: list[int] | tuple[int, ...]) -> BlockHash:
        return b"same" if parent is None else parent + b"."

    monkeypatch.setattr(blocks_module, "hash_block", colliding)
    bm = BlockManager(16, 2)
    computed_seq(bm, 1, [1, 2, 3, 4, 5])
    bm.free(1)
    assert bm.allocate(2, [7, 8, 3, 4, 5]) == 0  # same hash chain, different tokens
    assert bm.allocate(3, [1, 2, 9, 9, 5]) == 2
    bm.check_integrity()


def test_duplicate_registration_keeps_one_canonical_block() -> None:
    bm = BlockManager(16, 2)
    prompt = [1, 2, 3, 4, 5]
    bm.allocate(1, prompt)
    bm.allocate(2, prompt)  # both compute the same prefix at once
    bm.mark_computed(1, 5)
    bm.mark_computed(2, 5)
    bm.check_integrity()
    canonical = bm.block_table(1)[:2]
    bm.free(2)
    assert bm.num_cached_blocks == 0  # seq 2's copies were private: straight to free
    bm.free(1)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 14
    assert bm.allocate(3, prompt) == 4
    assert bm.block_table(3)[:2] == canonical
    bm.check_integrity()


# -- eviction ---------------------------------------------------------------------------------


def test_lru_evicts_least_recently_freed_and_tails_first() -> None:
    bm = BlockManager(16, 2)
    a, b = [1, 1, 2, 2, 0], [3, 3, 4, 4, 0]
    computed_seq(bm, 1, a)
    computed_seq(bm, 2, b)
    a_table, b_table = bm.block_table(1), bm.block_table(2)
    bm.free(1)
    bm.free(2)
    assert bm.num_cached_blocks == 4
    _evict_one(bm)  # a's tail: a is older, and its head outlives its tail
    assert bm.allocate(3, a) == 2 and bm.block_table(3)[0] == a_table[0]
    _evict_one(bm)  # b's tail (a's head was revived, so it is not evictable)
    assert bm.allocate(4, b) == 2 and bm.block_table(4)[0] == b_table[0]
    bm.check_integrity()


def _take_every_free_block(bm: BlockManager, seq_id: int) -> None:
    """Leaves only cached blocks to allocate from, so the next fresh block is an eviction."""
    if bm.num_free_blocks:
        bm.allocate(seq_id, [7] * (bm.num_free_blocks * bm.tokens_per_block))
    assert bm.num_free_blocks == 0


def _evict_one(bm: BlockManager) -> None:
    """Makes the manager evict exactly its least recently used cached block."""
    cached = bm.num_cached_blocks
    _take_every_free_block(bm, 1000)
    bm.allocate(1001, [9])
    for seq_id in (1000, 1001):
        if seq_id in bm:
            bm.free(seq_id)
    assert bm.num_cached_blocks == cached - 1


def test_revived_block_moves_to_the_most_recently_used_end() -> None:
    bm = BlockManager(16, 2)
    a, b = [1, 1, 0], [2, 2, 0]
    computed_seq(bm, 1, a)
    computed_seq(bm, 2, b)
    bm.free(1)
    bm.free(2)  # LRU order: a's head, b's head
    bm.allocate(3, a)  # revives a's head...
    bm.free(3)  # ...and returns it as the most recently used
    _evict_one(bm)  # b's head, now the least recently used
    assert bm.allocate(4, a) == 2
    assert bm.allocate(5, b) == 0
    bm.check_integrity()


def test_cached_blocks_are_evicted_lazily_only_when_nothing_is_free() -> None:
    bm = BlockManager(4, 2)
    computed_seq(bm, 1, [1, 2, 3])  # 1 registered block + 1 partial
    bm.free(1)
    assert (bm.num_free_blocks, bm.num_cached_blocks) == (3, 1)
    bm.allocate(2, [7, 7, 7, 7, 7])  # 3 blocks: all free ones, no eviction
    assert (bm.num_free_blocks, bm.num_cached_blocks) == (0, 1)
    assert bm.can_allocate(2) and not bm.can_allocate(3)
    bm.allocate(3, [8])  # needs the cached block
    assert (bm.num_free_blocks, bm.num_cached_blocks) == (0, 0)
    bm.free(2)
    bm.free(3)
    assert bm.allocate(4, [1, 2, 3]) == 0  # its prefix is gone
    bm.check_integrity()


def test_blocks_of_live_sequences_are_never_evicted() -> None:
    bm = BlockManager(8, 2)
    computed_seq(bm, 1, [1, 2, 3, 4, 5])
    table = bm.block_table(1)
    _take_every_free_block(bm, 2)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(3, [9])
    assert bm.block_table(1) == table and bm.num_used_blocks == 8


# -- exhaustion -------------------------------------------------------------------------------


def test_no_free_blocks_on_allocate_leaves_no_trace() -> None:
    bm = BlockManager(4, 2)
    computed_seq(bm, 1, [1, 2, 3, 4, 5])  # 3 blocks, 2 registered
    bm.free(1)
    bm.allocate(2, [9])
    before = snapshot(bm, [2])
    # 4 blocks needed, 2 hits (cached) + 2 fresh, but the hits cannot also be evicted.
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(3, [1, 2, 3, 4, 5, 6, 7])
    assert 3 not in bm and snapshot(bm, [2]) == before
    assert bm.allocate(3, [1, 2, 3, 4, 5, 6]) == 4  # 2 hits + 1 fresh fits
    bm.check_integrity()


def test_no_free_blocks_on_append_leaves_no_trace() -> None:
    bm = BlockManager(2, 2)
    bm.allocate(1, [1, 2, 3, 4])
    before = snapshot(bm, [1])
    assert not bm.can_append(1)
    with pytest.raises(NoFreeBlocksError):
        bm.append_token(1, 5)
    assert snapshot(bm, [1]) == before
    bm.check_integrity()


# -- errors -----------------------------------------------------------------------------------


def test_invalid_calls_raise() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)
    bm = BlockManager(8, 2)
    with pytest.raises(ValueError):
        bm.allocate(1, [])
    bm.allocate(1, [1, 2, 3])
    with pytest.raises(ValueError):
        bm.allocate(1, [1])
    with pytest.raises(ValueError):
        bm.mark_computed(1, 4)  # beyond the tokens
    bm.mark_computed(1, 2)
    with pytest.raises(ValueError):
        bm.mark_computed(1, 1)  # computed K/V does not go away
    bm.free(1)
    for call in (bm.free, bm.block_table, bm.num_tokens, bm.num_computed):
        with pytest.raises(KeyError):
            call(1)  # double free / unknown id
    assert bm.num_free_blocks + bm.num_cached_blocks == 8


# -- random operation sequences ---------------------------------------------------------------

# A tiny alphabet and a few shared document heads make prefix hits and collisions of
# partial contents frequent.
_HEADS = [(), (1, 2, 3, 4), (1, 2, 3, 4, 5, 6, 7, 8), (2, 2, 2, 2, 2, 2)]
_prompts = st.builds(
    lambda head, tail: [*head, *tail],
    st.sampled_from(_HEADS),
    st.lists(st.integers(0, 2), max_size=6),
).filter(bool)


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives random ops against a model of the sequences and the computed prefixes."""

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(1, 1)
        self.tokens: dict[int, list[int]] = {}
        self.computed_prefixes: set[tuple[int, ...]] = set()  # full-block prefixes with K/V
        self.next_id = 0

    @initialize(num_blocks=st.integers(3, 14), tokens_per_block=st.integers(1, 4))
    def setup(self, num_blocks: int, tokens_per_block: int) -> None:
        self.bm = BlockManager(num_blocks, tokens_per_block)
        self.evicted = False  # once a cached block is evicted, the longest hit may be gone

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _expected_hit(self, prompt: list[int]) -> int:
        tpb = self.bm.tokens_per_block
        k = (len(prompt) - 1) // tpb
        while k > 0 and tuple(prompt[: k * tpb]) not in self.computed_prefixes:
            k -= 1
        return k * tpb

    @rule(prompt=_prompts)
    def allocate(self, prompt: list[int]) -> None:
        seq_id, bm = self._new_id(), self.bm
        before = snapshot(bm, list(self.tokens))
        fits, cached_before = bm.can_allocate(len(prompt)), bm.num_cached_blocks
        fresh_before = bm.num_free_blocks
        try:
            cached = bm.allocate(seq_id, prompt)
        except NoFreeBlocksError:
            assert not fits
            assert snapshot(bm, list(self.tokens)) == before
            return
        self.tokens[seq_id] = list(prompt)
        assert cached % bm.tokens_per_block == 0 and cached < len(prompt)
        assert cached == 0 or tuple(prompt[:cached]) in self.computed_prefixes
        if not self.evicted:  # nothing ever left the cache: the longest prefix must be found
            assert cached == self._expected_hit(prompt)
        fresh = bm.blocks_needed(len(prompt)) - cached // bm.tokens_per_block
        self.evicted |= fresh > fresh_before and cached_before > 0
        assert bm.num_computed(seq_id) == cached and bm.num_tokens(seq_id) == len(prompt)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data: st.DataObject, token: int) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        bm = self.bm
        before = snapshot(bm, list(self.tokens))
        fits, table = bm.can_append(seq_id), bm.block_table(seq_id)
        try:
            bm.append_token(seq_id, token)
        except NoFreeBlocksError:
            assert not fits and snapshot(bm, list(self.tokens)) == before
            return
        assert fits
        self.evicted |= len(bm.block_table(seq_id)) > len(table) and before[0][0] == 0
        self.tokens[seq_id].append(token)
        new_table = bm.block_table(seq_id)
        assert len(new_table) == bm.blocks_needed(len(self.tokens[seq_id]))
        assert new_table[: len(table)] == table  # blocks already held never move

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def mark_computed(self, data: st.DataObject) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        tokens = self.tokens[seq_id]
        done = data.draw(st.integers(self.bm.num_computed(seq_id), len(tokens)))
        self.bm.mark_computed(seq_id, done)
        tpb = self.bm.tokens_per_block
        for k in range(1, done // tpb + 1):
            self.computed_prefixes.add(tuple(tokens[: k * tpb]))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        """Rolls back uncomputed tokens (rejected drafts), as speculative decoding does."""
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        bm, tokens = self.bm, self.tokens[seq_id]
        keep = data.draw(st.integers(bm.num_computed(seq_id), len(tokens)))
        table, cached = bm.block_table(seq_id), bm.num_cached_blocks
        bm.truncate(seq_id, keep)
        del tokens[keep:]
        assert bm.block_table(seq_id) == table[: bm.blocks_needed(keep)]
        assert bm.num_cached_blocks == cached  # only unregistered blocks were let go

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(seq_id)
        del self.tokens[seq_id]
        with pytest.raises(KeyError):
            self.bm.free(seq_id)

    @invariant()
    def consistent(self) -> None:
        bm = self.bm
        bm.check_integrity()
        referenced = {b for s in self.tokens for b in bm.block_table(s)}
        assert bm.num_used_blocks == len(referenced)
        assert bm.num_free_blocks + bm.num_cached_blocks + bm.num_used_blocks == bm.num_blocks
        for seq_id, tokens in self.tokens.items():
            assert bm.num_tokens(seq_id) == len(tokens)

    def teardown(self) -> None:
        bm = self.bm
        for seq_id in list(self.tokens):
            bm.free(seq_id)
        bm.check_integrity()
        assert bm.num_used_blocks == 0  # no leak
        assert bm.num_free_blocks + bm.num_cached_blocks == bm.num_blocks
        assert bm.can_allocate(bm.num_blocks * bm.tokens_per_block)  # cached ones are evictable


BlockManagerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
