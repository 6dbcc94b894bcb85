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
    logits: np.ndarray  # [num_sampling_chunks, vocab], in chunk order
    scored: np.ndarray  # [sum of span counts, hidden], final normed hidden states
    spans: tuple[ScoreSpan, ...]


class ModelRunner:
    """Packs chunks into one matrix (each layer is one GEMM per weight over all of them) and
    returns the logits of the chunks that sample, in chunk order, plus the hidden states of
    prompt positions being scored (the LM head runs on those in bounded pieces, later)."""

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
        tpb = self.blocks.tokens_per_block
        ids, positions, slots = [], [], []
        prefills: list[PrefillSegment] = []
        dec_rows, dec_lens, dec_tables = [], [], []
        sample_rows: list[int] = []
        score_rows: list[np.ndarray] = []
        spans: list[ScoreSpan] = []
        row = 0
        for index, chunk in enumerate(chunks):
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            table = np.asarray(self.blocks.block_table(seq.request_id), dtype=np.int64)
            pos = np.arange(start, start + n)
            ids.append(np.asarray(seq.token_ids[start : start + n], dtype=np.int64))
            positions.append(pos)
            slots.append(table[pos // tpb] * tpb + pos % tpb)
            num_blocks = -(-(start + n) // tpb)
            if n == 1:  # one query over its context: the same math as a decode
                dec_rows.append(row)
                dec_lens.append(start + 1)
                dec_tables.append(table[:num_blocks])
            else:
                prefills.append(PrefillSegment(row, n, start, table[:num_blocks]))
            if chunk.samples:
                sample_rows.append(row + n - 1)
            span = _score_span(index, chunk)
            if span is not None:
                spans.append(span)
                score_rows.append(np.arange(span.first, span.first + span.count) - start + row)
            row += n
        batch = ForwardBatch(
            token_ids=np.concatenate(ids),
            positions=np.concatenate(positions),
            slots=np.concatenate(slots),
            prefills=tuple(prefills),
            decode=_decode_group(dec_rows, dec_lens, dec_tables),
            sample_rows=np.concatenate([np.asarray(sample_rows, dtype=np.int64), *score_rows]),
        )
        return batch, tuple(spans)


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
