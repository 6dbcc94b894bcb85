"""What the GPU tests share: the skip, one executor open at a time, and driving requests."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine_builder.manifest import Manifest
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import (
    ExecRequest,
    Executor,
    FinishReason,
    SamplingParams,
    TokenDelta,
)


def require_gpu_and_tensorrt_llm() -> None:
    """Skips the calling test module without an NVIDIA GPU or tensorrt_llm."""
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no NVIDIA GPU", allow_module_level=True)
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    if out.returncode != 0 or "GPU " not in out.stdout:
        pytest.skip("no NVIDIA GPU", allow_module_level=True)
    pytest.importorskip("tensorrt_llm")


class OneAtATime:
    """At most one executor open: opening another shuts the last one down first, which gives
    its GPU memory back (a target, its draft and a second copy would not fit together)."""

    def __init__(self) -> None:
        self._name: str | None = None
        self._executor: Executor | None = None

    def get(self, name: str, opener: Callable[[], Executor]) -> Executor:
        if self._name != name or self._executor is None:
            self.close()
            self._executor = opener()
            self._name = name
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
        self._executor = None
        self._name = None


def run(ex: Executor, requests: list[ExecRequest], timeout: float = 120.0
        ) -> dict[int, list[TokenDelta]]:
    out: dict[int, list[TokenDelta]] = {r.request_id: [] for r in requests}
    for r in requests:
        ex.enqueue(r)
    open_ids = set(out)
    deadline = time.monotonic() + timeout
    while open_ids and time.monotonic() < deadline:
        for d in ex.poll(0.1):
            assert d.request_id in open_ids, f"delta after the final: {d}"
            out[d.request_id].append(d)
            if d.finish is not None:
                open_ids.discard(d.request_id)
    assert not open_ids, f"no final within {timeout}s for {sorted(open_ids)}"
    return out


def tokens(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def tokenizer(engine_dir: Path) -> EngineTokenizer:
    return EngineTokenizer.load(engine_dir, Manifest.load(engine_dir))


def prompt_ids(engine_dir: Path, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(engine_dir).encode(text))


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, **kw)  # type: ignore[arg-type]


# -- checks both backends pass ---------------------------------------------------------------


def check_streams_greedy_text(ex: Executor, engine_dir: Path) -> None:
    prompt = prompt_ids(engine_dir, "The capital of France is")
    deltas = run(ex, [ExecRequest(1, prompt, greedy(16))])[1]
    out = tokens(deltas)
    assert 1 <= len(out) <= 16
    assert deltas[-1].finish in (FinishReason.LENGTH, FinishReason.STOP)
    text = tokenizer(engine_dir).decode(out, skip_special_tokens=True)
    assert "".join(d.text for d in deltas) == text


def check_greedy_repeats_and_reuses_the_prefix(ex: Executor, engine_dir: Path) -> None:
    tpb = ex.capacity.tokens_per_block
    base = prompt_ids(engine_dir, "Once upon a time, in a land far away, there lived " * 8)
    prompt = base[:3 * tpb] if len(base) >= 3 * tpb else base
    first = run(ex, [ExecRequest(10, prompt, greedy(12))])[10]
    second = run(ex, [ExecRequest(11, prompt, greedy(12))])[11]
    assert tokens(first) == tokens(second)
    if len(prompt) >= 2 * tpb:
        assert (second[0].cached_prompt_tokens or 0) >= tpb


def check_temperature_alone_samples(ex: Executor, engine_dir: Path) -> None:
    """Unset top_k/top_p would make TensorRT-LLM decode greedily: seeds must change text."""
    prompt = prompt_ids(engine_dir, "Write a word:")
    reqs = [ExecRequest(50 + s, prompt, SamplingParams(temperature=1.0, max_tokens=24, seed=s))
            for s in range(4)]
    assert len({tuple(tokens(ds)) for ds in run(ex, reqs).values()}) > 1


def check_cancel(ex: Executor, engine_dir: Path) -> None:
    prompt = prompt_ids(engine_dir, "Count to one thousand:")
    ex.enqueue(ExecRequest(200, prompt, greedy(400, ignore_eos=True)))
    time.sleep(0.2)
    ex.cancel(200)
    finals: list[TokenDelta] = []
    deadline = time.monotonic() + 60
    while not finals and time.monotonic() < deadline:
        finals = [d for d in ex.poll(0.1) if d.request_id == 200 and d.finish is not None]
    assert finals and finals[0].finish is FinishReason.CANCELLED
