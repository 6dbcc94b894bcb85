"""Opening the adapter over the fake engine, and reading a request's stream to its end."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import Executor, TokenDelta
from server.executor.trtllm.bindings import open_engine
from server.executor.trtllm.config import TrtllmConfig
from server.executor.trtllm.executor import TrtllmExecutor
from server.executor.trtllm.open import engine_config
from tests.unit.trtllm.conftest import EOS
from tests.unit.trtllm.fake_model import FakeModel


def open_fake_engine(b: Any, root: Path, cfg: TrtllmConfig, fraction: float = 0.9) -> Any:
    manifest = Manifest.load(root)
    return open_engine(b, root, manifest, engine_config(b, manifest, cfg, fraction))


def open_plain(b: Any, root: Path, config: TrtllmConfig | None = None
               ) -> tuple[TrtllmExecutor, Any]:
    """The adapter and the fake engine under it (the engine for assertions)."""
    cfg = config or TrtllmConfig(await_timeout_s=0.005)
    manifest = Manifest.load(root)
    engine = open_fake_engine(b, root, cfg)
    tokenizer = EngineTokenizer.load(root, manifest)
    return TrtllmExecutor(engine, b, tokenizer, manifest, cfg), engine


def collect(ex: Executor, request_ids: Sequence[int], timeout: float = 10.0
            ) -> dict[int, list[TokenDelta]]:
    """Every delta of the given requests until each has its final; fails on a second final."""
    out: dict[int, list[TokenDelta]] = {rid: [] for rid in request_ids}
    deadline = time.monotonic() + timeout
    open_ids = set(request_ids)
    while open_ids:
        assert time.monotonic() < deadline, f"no final for {sorted(open_ids)}"
        for delta in ex.poll(0.05):
            assert delta.request_id in out, f"delta for unknown request {delta.request_id}"
            assert delta.request_id in open_ids, f"delta after the final: {delta}"
            out[delta.request_id].append(delta)
            if delta.finish is not None:
                open_ids.discard(delta.request_id)
    return out


def tokens_of(deltas: Sequence[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def text_of(deltas: Sequence[TokenDelta]) -> str:
    return "".join(d.text for d in deltas)


def expected_tokens(model: FakeModel, context: Sequence[int], n: int) -> list[int]:
    """What the fake engine generates greedily after context (stops early at EOS)."""
    ctx = list(context)
    out: list[int] = []
    for _ in range(n):
        token = model.token(ctx, EOS)
        if token == EOS:
            break
        out.append(token)
        ctx.append(token)
    return out
