"""Chained hashes of full KV blocks: one digest names a whole token prefix.

A block's hash covers its parent block's hash and its own tokens, so block i's hash identifies
tokens ``[0, (i + 1) * tokens_per_block)`` and a single dict lookup per block finds a cached
prefix. The digest is a 128-bit BLAKE2b rather than Python's ``hash()``: a collision between two
different *parents* cannot be caught by comparing one block's tokens, so the chain itself has to
be collision resistant. The block manager still compares stored tokens on every hit.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence

BlockHash = bytes
# (parent block's hash or None for the first block, this block's tokens) -> hash.
BlockHasher = Callable[[BlockHash | None, Sequence[int]], BlockHash]

_DIGEST_SIZE = 16
_PERSON = b"backfill-kv-v1"  # domain separation: these digests mean nothing elsewhere


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash of one full block given its parent's hash (None for the first block).

    Deterministic across processes (unlike ``hash()`` of str). The first block hashes no parent
    bytes; since every parent digest has a fixed length and a manager's blocks all hold the same
    number of tokens, a first block can never encode the same bytes as a later one.
    """
    digest = hashlib.blake2b(digest_size=_DIGEST_SIZE, person=_PERSON)
    if parent is not None:
        digest.update(parent)
    # Signed 64-bit: token ids are small non-negative ints; anything else is a caller bug and
    # raises (OverflowError / TypeError) rather than hashing ambiguously.
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()
