"""benchmarks/bench_gpu.py's closed loop over the fake engine (the numbers need a GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.bench_gpu import run_closed_loop
from tests.unit.trtllm.conftest import make_engine_dir
from tests.unit.trtllm.helpers import open_plain

pytestmark = pytest.mark.unit


def test_closed_loop_finishes_every_request(bindings: Any, tmp_path: Path) -> None:
    ex, engine = open_plain(bindings, make_engine_dir(tmp_path, max_batch_size=4))
    try:
        work = [tuple(range(97, 97 + 5 + i)) for i in range(10)]
        tps, ttfts, tpots, acceptance = run_closed_loop(ex, work, concurrency=3, max_tokens=6)
    finally:
        ex.shutdown()
    assert len(engine.enqueued) == 10 and len(ttfts) == 10 and len(tpots) == 10
    assert tps > 0 and acceptance is None
    assert all(r.max_tokens == 6 for r in engine.enqueued)
