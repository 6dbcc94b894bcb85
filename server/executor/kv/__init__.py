"""The paged KV cache in one place: block bookkeeping with prefix caching (``blocks``), the
chained block hashes that name prefixes (``prefix``) and the storage that holds K/V values
(``paged``)."""

from server.executor.kv.blocks import BlockManager, NoFreeBlocksError
from server.executor.kv.paged import PagedKvCache

__all__ = ["BlockManager", "NoFreeBlocksError", "PagedKvCache"]
