"""One step's forward pass: the chunks packed into one batch, run through the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.executor.cpu.attention import DecodeGroup, PrefillSegment
from server.executor.cpu.model import ForwardBatch, ForwardPass, LlamaModel
from server.executor.cpu.sequence import Chunk
from server.executor.kv import BlockManager, PagedKvCache


@dataclass(frozen=True, slots=True)
class ScoreSpan:
    """Prompt positions [first, first + count) of ``chunks[chunk]``'s sequence whose next-token
    logprobs are wanted (prompt_logprobs); their hidden rows are consecutive in StepOutput."""

    chunk: int
    first: int
    count: int


@dataclass(frozen=True, slots=True)
class StepPass:
    """A step's forward pass under way, and what ``finish`` needs to split its result."""

    forward: ForwardPass
    spans: tuple[ScoreSpan, ...]
    num_samples: int  # rows of the chunks that sample; scored prompt rows follow them


@dataclass(frozen=True, slots=True)
class StepOutput:
    # [sum of chunks' num_sample_rows, vocab], in chunk order: one row per sampling chunk,
    # 1 + len(draft) rows per verify chunk.
    logits: np.ndarray
    scored: np.ndarray  # [sum of span counts, hidden], final normed hidden states
    spans: tuple[ScoreSpan, ...]


class ModelRunner:
    """Packs chunks into one matrix (each layer is one GEMM per weight over all of them) and
    returns the logits of the chunks that sample (every row of a verify chunk), in chunk
    order, plus the hidden states of prompt positions being scored (the LM head runs on those
    in bounded pieces, later)."""

    def __init__(self, model: LlamaModel, cache: PagedKvCache, blocks: BlockManager) -> None:
        self.model = model
        self.cache = cache
        self.blocks = blocks

    def run(self, chunks: list[Chunk]) -> StepOutput:
        """Writes the chunks' K/V into the cache and returns what the step's sequences need."""
        return self.finish(self.start(chunks))

    def start(self, chunks: list[Chunk]) -> StepPass:
        """The chunks' forward pass, to run a layer at a time (``StepPass.forward``) and
        ``finish``."""
        batch, spans = self.build_batch(chunks)
        return StepPass(ForwardPass(self.model, batch, self.cache), spans,
                        len(batch.sample_rows) - sum(span.count for span in spans))

    def finish(self, step: StepPass) -> StepOutput:
        """Runs the layers left; the logits of the chunks that sample, and the hidden states
        of the prompt positions being scored."""
        h = step.forward.hidden()  # [num_samples + num_scored, hidden]
        n = step.num_samples
        return StepOutput(self.model.lm_head(h[:n]), h[n:], step.spans)

    def build_batch(self, chunks: list[Chunk]) -> tuple[ForwardBatch, tuple[ScoreSpan, ...]]:
        builder = BatchBuilder(self.blocks.tokens_per_block)
        score_rows: list[np.ndarray] = []
        spans: list[ScoreSpan] = []
        for index, chunk in enumerate(chunks):
            seq = chunk.seq
            row = builder.add(
                np.asarray(chunk.token_ids(), dtype=np.int64),
                chunk.start,
                np.asarray(self.blocks.block_table(seq.request_id), dtype=np.int64),
                chunk.num_sample_rows,
            )
            span = _score_span(index, chunk)
            if span is not None:
                spans.append(span)
                score_rows.append(np.arange(span.first, span.first + span.count) - chunk.start
                                  + row)
        return builder.build(score_rows), tuple(spans)


class BatchBuilder:
    """Packs sequences' token runs into one ForwardBatch: a run of one token is a decode row
    (attended with all the others in one pass), a longer one a causal prefill segment."""

    def __init__(self, tokens_per_block: int) -> None:
        self._tpb = tokens_per_block
        self._ids: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []
        self._slots: list[np.ndarray] = []
        self._prefills: list[PrefillSegment] = []
        self._dec_rows: list[int] = []
        self._dec_lens: list[int] = []
        self._dec_tables: list[np.ndarray] = []
        self._sample_rows: list[np.ndarray] = []
        self._rows = 0

    def add(self, token_ids: np.ndarray, start: int, table: np.ndarray, num_samples: int) -> int:
        """Tokens at positions [start, start + n) of a sequence with block table ``table``;
        the last ``num_samples`` rows' logits are wanted, in order. Returns the first row."""
        tpb, row, n = self._tpb, self._rows, len(token_ids)
        pos = np.arange(start, start + n)
        self._ids.append(token_ids)
        self._positions.append(pos)
        self._slots.append(table[pos // tpb] * tpb + pos % tpb)
        num_blocks = -(-(start + n) // tpb)
        if n == 1:  # one query over its context: the same math as a decode
            self._dec_rows.append(row)
            self._dec_lens.append(start + 1)
            self._dec_tables.append(table[:num_blocks])
        else:
            self._prefills.append(PrefillSegment(row, n, start, table[:num_blocks]))
        self._sample_rows.append(np.arange(row + n - num_samples, row + n))
        self._rows += n
        return row

    def build(self, extra_rows: list[np.ndarray] | None = None) -> ForwardBatch:
        """The batch; ``extra_rows`` follow the sample rows in ``sample_rows``."""
        rows = [*self._sample_rows, *(extra_rows or [])]
        return ForwardBatch(
            token_ids=np.concatenate(self._ids),
            positions=np.concatenate(self._positions),
            slots=np.concatenate(self._slots),
            prefills=tuple(self._prefills),
            decode=_decode_group(self._dec_rows, self._dec_lens, self._dec_tables),
            sample_rows=np.concatenate(rows).astype(np.int64),
        )


def _score_span(index: int, chunk: Chunk) -> ScoreSpan | None:
    """The positions of this chunk whose logits score a prompt token not scored yet: position
    p predicts token p + 1, and the prompt's last position predicts the first output token."""
    seq = chunk.seq
    scored = seq.prompt_logprobs
    if scored is None or not seq.scores_prompt:
        return None
    first = max(chunk.start, len(scored))  # positions before were scored in an earlier run
    end = min(chunk.start + chunk.num_tokens, seq.prompt_len - 1)
    return ScoreSpan(index, first, end - first) if end > first else None


def _decode_group(rows: list[int], lens: list[int], tables: list[np.ndarray]) -> DecodeGroup | None:
    if not rows:
        return None
    width = max(len(t) for t in tables)
    padded = np.empty((len(tables), width), dtype=np.int64)  # [B, max_blocks]
    for i, table in enumerate(tables):
        padded[i, : len(table)] = table
        padded[i, len(table) :] = table[0]  # any valid block; masked by context_lens
    return DecodeGroup(np.asarray(rows), np.asarray(lens), padded)
