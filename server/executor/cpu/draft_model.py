"""The draft-model drafter: a smaller engine sharing the target's tokenizer, run in the same
process with a paged KV cache of its own, proposing tokens one batched pass at a time.

Per step, for all the sequences that speculate together: the first pass feeds each the tokens
its draft KV lacks (the whole prompt the first time, then the tokens the target kept since:
the accepted drafts and its own token) and proposes the first token from the last row; each
further pass feeds the token just proposed and proposes the next. Proposals follow the
request's own sampling (penalties, min_tokens, temperature, top-k, top-p): greedy requests get
the draft's argmax, sampled ones a draw from the draft's distribution q, which the target's
rejection sampling then needs (``verify.py``).

The draft's KV of a drafted token stays valid when the target accepts it, so a sequence's
draft cache is synced by the longest common prefix of what it computed and the sequence's
verified tokens. Only verified tokens are ever marked computed (and so offered to the draft's
own prefix cache); rejected ones are cut off with ``BlockManager.truncate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine_builder.manifest import Manifest
from server.executor.cpu.drafter import DRAFT_MODEL, Draft, DraftRequest
from server.executor.cpu.gemma import load_model
from server.executor.cpu.model import ForwardPass, LlamaModel
from server.executor.cpu.model_runner import BatchBuilder
from server.executor.cpu.sampling import dense, distribution, draw, uniform
from server.executor.cpu.sequence import Sequence
from server.executor.cpu.weights import load_weights
from server.executor.kv import BlockManager, NoFreeBlocksError, PagedKvCache

# The independent draw of a token index that a sampled draft proposes with (the target's
# acceptance uses the index's own draw, ``sampling.uniform``).
DRAFT_STREAM = 2


@dataclass(slots=True, eq=False)
class _Proposal:
    """One sequence's drafting in this step."""

    seq: Sequence
    max_tokens: int
    feed: list[int]  # tokens the next pass computes for it
    start: int  # the position of feed[0]
    tokens: list[int] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)


class DraftModelDrafter:
    """Proposes with a draft model. Single-threaded (the engine's)."""

    name = DRAFT_MODEL

    def __init__(self, model: LlamaModel, cache: PagedKvCache, blocks: BlockManager) -> None:
        self.model = model
        self.cache = cache
        self.blocks = blocks
        self._written: dict[int, list[int]] = {}  # tokens whose K/V the draft cache holds

    def propose(self, requests: list[DraftRequest]) -> dict[int, Draft]:
        live = [p for p in (self._sync(r) for r in requests) if p is not None]
        proposals = list(live)
        while live:
            logits = self._forward(live)  # [len(live), vocab]
            for p, row in zip(live, logits, strict=True):
                self._written[p.seq.request_id] += p.feed
                if not p.tokens:
                    # The verified context is in the cache now. Its last token stays unmarked:
                    # a sequence the target step left out comes back with the same tokens,
                    # and its last token is computed again for its logits.
                    self.blocks.mark_computed(p.seq.request_id, len(p.seq.token_ids) - 1)
                self._propose_one(p, row)
            live = [p for p in live if self._continues(p)]
        return {
            p.seq.request_id: Draft(tuple(p.tokens), np.stack(p.probs) if p.probs else None)
            for p in proposals
        }

    def retain(self, request_ids: set[int]) -> None:
        for rid in [rid for rid in self._written if rid not in request_ids]:
            self.blocks.free(rid)
            del self._written[rid]

    def _sync(self, r: DraftRequest) -> _Proposal | None:
        """Cuts the sequence's draft cache back to what still matches its tokens and reserves
        slots for the rest; None when the draft's pool has no room (it does not draft)."""
        seq, rid = r.seq, r.seq.request_id
        context = seq.token_ids
        try:
            if rid not in self._written:
                cached = self.blocks.allocate(rid, context)
                self._written[rid] = context[:cached]
            else:
                keep = min(_common_prefix(self._written[rid], context), len(context) - 1)
                self.blocks.truncate(rid, keep)
                del self._written[rid][keep:]
                for token in context[keep:]:
                    self.blocks.append_token(rid, token)
        except NoFreeBlocksError:
            self._forget(rid)
            return None
        done = len(self._written[rid])
        return _Proposal(seq, r.max_tokens, context[done:], done)

    def _forward(self, live: list[_Proposal]) -> np.ndarray:
        builder = BatchBuilder(self.blocks.tokens_per_block)
        for p in live:
            table = np.asarray(self.blocks.block_table(p.seq.request_id), dtype=np.int64)
            builder.add(np.asarray(p.feed, dtype=np.int64), p.start, table, 1)
        hidden = ForwardPass(self.model, builder.build(), self.cache).hidden()
        return self.model.lm_head(hidden)

    def _propose_one(self, p: _Proposal, logits: np.ndarray) -> None:
        """The next drafted token from the draft's logits [vocab], as the request samples."""
        seq, i = p.seq, len(p.tokens)
        params = seq.request.sampling
        context = ((seq.request.prompt_token_ids, [*seq.generated_ids, *p.tokens])
                   if params.penalized else ((), ()))
        candidates, weights = distribution(
            logits, params, seq.tracker.banned_ids(ahead=i), context
        )
        if params.temperature == 0.0:
            p.tokens.append(int(candidates[0]))
            return
        index = seq.tracker.num_generated + i
        p.tokens.append(draw(candidates, weights, uniform(seq.seed, index, DRAFT_STREAM)))
        p.probs.append(dense(candidates, weights, len(logits)))

    def _continues(self, p: _Proposal) -> bool:
        """Whether to draft one more token for p, reserving its slot (the token just drafted
        is what the next pass computes)."""
        if len(p.tokens) >= p.max_tokens:
            return False
        rid = p.seq.request_id
        if not self.blocks.can_append(rid):
            return False
        token = p.tokens[-1]
        self.blocks.append_token(rid, token)
        p.start += len(p.feed)
        p.feed = [token]
        return True

    def _forget(self, rid: int) -> None:
        if rid in self.blocks:
            self.blocks.free(rid)
        self._written.pop(rid, None)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def open_draft_model(draft_dir: Path, target: Manifest, max_seq_len: int,
                     num_kv_blocks: int | None = None) -> DraftModelDrafter:
    """The draft engine at ``draft_dir``: weights, and a KV pool of its own sized by its
    manifest (or ``num_kv_blocks``). ValueError when its vocabulary is not the target's."""
    manifest = Manifest.load(draft_dir)
    if manifest.backend != "cpu":
        raise ValueError(f"{draft_dir}: a cpu engine's draft must be a cpu engine, got "
                         f"{manifest.backend!r}")
    arch, limits = manifest.architecture, manifest.limits
    if arch.vocab_size != target.architecture.vocab_size:
        raise ValueError(f"{draft_dir}: the draft's vocabulary has {arch.vocab_size} tokens, "
                         f"the target's {target.architecture.vocab_size}; a draft must share "
                         "the target's tokenizer")
    weights = load_weights(manifest.weights_path(draft_dir), manifest)
    model = load_model(weights, arch, min(max_seq_len, arch.max_position_embeddings))
    blocks = num_kv_blocks or limits.num_kv_blocks
    cache = PagedKvCache(arch.num_layers, blocks, limits.tokens_per_block, arch.num_kv_heads,
                         arch.head_dim, manifest.quantization.kv_cache_dtype)
    return DraftModelDrafter(model, cache, BlockManager(blocks, limits.tokens_per_block))
