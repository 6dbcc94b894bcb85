"""One step's forward pass: the chunks packed into one batch, run through the model."""

from __future__ import annotations

import numpy as np

from server.executor.cpu.attention import DecodeGroup, PrefillSegment
from server.executor.cpu.model import ForwardBatch, ForwardPass, LlamaModel
from server.executor.cpu.sequence import Chunk
from server.executor.kv import BlockManager, PagedKvCache


class ModelRunner:
    """Packs chunks into one matrix (each layer is one GEMM per weight over all of them) and
    returns the logits of the chunks that sample, in chunk order."""

    def __init__(self, model: LlamaModel, cache: PagedKvCache, blocks: BlockManager) -> None:
        self.model = model
        self.cache = cache
        self.blocks = blocks

    def start(self, chunks: list[Chunk]) -> ForwardPass:
        """The chunks' forward pass, to run a layer at a time; its ``logits`` are those of the
        chunks that sample, `[num_sampling_chunks, vocab]`."""
        return ForwardPass(self.model, self.build_batch(chunks), self.cache)

    def build_batch(self, chunks: list[Chunk]) -> ForwardBatch:
        tpb = self.blocks.tokens_per_block
        ids, positions, slots = [], [], []
        prefills: list[PrefillSegment] = []
        dec_rows, dec_lens, dec_tables = [], [], []
        sample_rows = []
        row = 0
        for chunk in chunks:
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
            row += n
        return ForwardBatch(
            token_ids=np.concatenate(ids),
            positions=np.concatenate(positions),
            slots=np.concatenate(slots),
            prefills=tuple(prefills),
            decode=_decode_group(dec_rows, dec_lens, dec_tables),
            sample_rows=np.asarray(sample_rows, dtype=np.int64),
        )


def _decode_group(rows: list[int], lens: list[int], tables: list[np.ndarray]) -> DecodeGroup | None:
    if not rows:
        return None
    width = max(len(t) for t in tables)
    padded = np.empty((len(tables), width), dtype=np.int64)  # [B, max_blocks]
    for i, table in enumerate(tables):
        padded[i, : len(table)] = table
        padded[i, len(table) :] = table[0]  # any valid block; masked by context_lens
    return DecodeGroup(np.asarray(rows), np.asarray(lens), padded)
