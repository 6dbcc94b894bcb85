"""LlmApiExecutor over the fake LLM API: streaming, finishes, cancel (abort), errors, sampling,
stats from get_stats_async, speculative configs, shutdown."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from engine_builder.manifest import Manifest, SpeculativeInfo
from server.executor.base import ExecRequest, Executor, FinishReason, SamplingParams
from server.executor.factory import load_executor
from server.executor.trtllm.config import TrtllmConfig
from server.executor.trtllm.llmapi import LlmApiExecutor
from server.executor.trtllm.llmapi_args import llm_kwargs, load_llmapi
from tests.unit.trtllm import fake_model
from tests.unit.trtllm.conftest import EOS, install_fakes, make_llmapi_dir
from tests.unit.trtllm.fake_model import FakeModel
from tests.unit.trtllm.helpers import collect, expected_tokens, text_of, tokens_of

pytestmark = pytest.mark.unit

PROMPT = (104, 105, 32, 116, 104, 101, 114, 101)
MODEL = FakeModel(vocab_size=257)
FAST = TrtllmConfig(await_timeout_s=0.01)


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


@pytest.fixture
def opened(llmapi: Any, tmp_path: Path) -> Any:
    made: list[LlmApiExecutor] = []

    def _open(**kw: Any) -> LlmApiExecutor:
        root = make_llmapi_dir(tmp_path / f"e{len(made)}", **kw)
        ex = LlmApiExecutor.from_manifest(root, Manifest.load(root), FAST)
        made.append(ex)
        return ex

    yield _open
    for ex in made:
        ex.shutdown()


def engine_of(ex: LlmApiExecutor) -> Any:
    return ex._llm.engine  # the fake's engine, for assertions


def test_streams_tokens_and_text(opened: Any) -> None:
    ex = opened()
    assert isinstance(ex, Executor)
    ex.enqueue(ExecRequest(1, PROMPT, greedy(12)))
    deltas = collect(ex, [1])[1]
    want = expected_tokens(MODEL, PROMPT, 12)
    assert tokens_of(deltas) == want and text_of(deltas) == bytes(want).decode()
    assert len(deltas) >= 10 and deltas[-1].finish is FinishReason.LENGTH


def test_resume_eos_and_stop_ids(opened: Any) -> None:
    ex = opened(fake={"eos_every": 14})
    full = expected_tokens(MODEL, PROMPT, 5)
    ex.enqueue(ExecRequest(1, PROMPT, greedy(10), resume_token_ids=tuple(full[:2])))
    ex.enqueue(ExecRequest(2, PROMPT, greedy(30)))
    out = collect(ex, [1, 2])
    assert tokens_of(out[1])[:3] == full[2:]  # resumed: no repeat
    assert out[2][-1].finish is FinishReason.STOP  # EOS at context length 14
    assert len(tokens_of(out[2])) == 14 - len(PROMPT)
    want = expected_tokens(MODEL, PROMPT, 20)
    ex.enqueue(ExecRequest(3, PROMPT, greedy(20, stop_token_ids=(want[5],))))
    stopped = collect(ex, [3])[3]
    assert stopped[-1].finish is FinishReason.STOP
    assert tokens_of(stopped) == want[:want.index(want[5]) + 1]  # the stop id is kept


def test_sampling_is_explicit_and_seeded(opened: Any) -> None:
    ex = opened()
    outs = []
    for seed in (1, 2, 1):
        ex.enqueue(ExecRequest(seed + len(outs) * 10, PROMPT,
                               SamplingParams(temperature=0.9, max_tokens=16, seed=seed)))
        outs.append(tokens_of(collect(ex, [seed + len(outs) * 10])[seed + len(outs) * 10]))
    assert outs[0] == outs[2] != outs[1]
    assert expected_tokens(MODEL, PROMPT, 16) not in outs


def test_stop_string_cuts_the_text_and_aborts(opened: Any) -> None:
    ex = opened()
    want = bytes(expected_tokens(MODEL, PROMPT, 40)).decode()
    stop = want[9:12]
    ex.enqueue(ExecRequest(1, PROMPT, greedy(40, stop=(stop,))))
    deltas = collect(ex, [1])[1]
    assert deltas[-1].finish is FinishReason.STOP
    assert text_of(deltas) == want[:want.index(stop)]
    time.sleep(0.05)
    assert engine_of(ex).cancel_calls == [2]  # the probe was request 1
    assert ex.poll(0.05) == []


def test_cancel_ends_at_once_and_aborts(opened: Any) -> None:
    ex = opened(max_batch_size=1)
    ex.enqueue(ExecRequest(1, PROMPT, greedy(110)))
    ex.enqueue(ExecRequest(2, PROMPT, greedy(10)))
    first = []
    while not first:
        first = [d for d in ex.poll(0.05) if d.request_id == 1]
    ex.cancel(2)
    ex.cancel(99)  # unknown: a no-op
    out = collect(ex, [1, 2])
    assert out[2][-1].finish is FinishReason.CANCELLED
    assert out[1][-1].finish is FinishReason.LENGTH
    assert engine_of(ex).cancel_calls == [3]


def test_engine_errors_and_refusals_end_the_request(opened: Any) -> None:
    ex = opened(fake={"fail_at_context_len": len(PROMPT) + 3})
    ex.enqueue(ExecRequest(1, PROMPT, greedy(10)))
    deltas = collect(ex, [1])[1]
    assert deltas[-1].finish is FinishReason.ERROR
    assert "illegal memory access" in (deltas[-1].error or "")
    with pytest.raises(ValueError):
        ex.enqueue(ExecRequest(2, tuple([97] * 128), greedy(4)))


def test_stats_capacity_and_prefix_reuse(opened: Any) -> None:
    ex = opened(fake={"num_blocks": 40})
    assert ex.capacity.num_kv_blocks == 40  # measured by the probe at open
    prompt = tuple(97 + i % 26 for i in range(40))
    ex.enqueue(ExecRequest(1, prompt, greedy(6)))
    collect(ex, [1])
    ex.enqueue(ExecRequest(2, prompt, greedy(6)))
    second = collect(ex, [2])[2]
    assert second[0].cached_prompt_tokens == 32  # one full block reused
    deadline = time.monotonic() + 5
    while ex.stats().steps < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = ex.stats()
    assert stats.generated_tokens == 12 and stats.prompt_tokens == 80
    assert stats.cached_prompt_tokens == 32 and stats.kv_blocks_total == 40
    assert stats.steps >= 8 and stats.busy_seconds > 0


def test_shutdown_cancels_live_requests_and_frees_the_gpu(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    device = fake_model.FakeDevice(total_blocks=1000)
    install_fakes(monkeypatch, device)
    root = make_llmapi_dir(tmp_path, fake={"num_blocks": 10**6})
    ex = load_executor(root)
    assert isinstance(ex, LlmApiExecutor) and ex.capacity.num_kv_blocks == 900
    ex.enqueue(ExecRequest(1, PROMPT, greedy(100)))
    ex.shutdown()
    finals = [d for d in ex.poll(0.2) if d.finish is not None]
    assert [(d.request_id, d.finish) for d in finals] == [(1, FinishReason.CANCELLED)]
    assert device.used == 0
    ex.shutdown()  # idempotent
    assert ex.stats().kv_blocks_total == 900
    with pytest.raises(ValueError, match="shut down"):
        ex.enqueue(ExecRequest(2, PROMPT, greedy(4)))


@pytest.mark.parametrize(("spec", "kind"), [
    (SpeculativeInfo("draft_target", 3, model="draft"), "DraftTargetDecodingConfig"),
    (SpeculativeInfo("ngram", 3, max_matching_ngram_size=2), "NGramDecodingConfig"),
    (SpeculativeInfo("eagle3", 3, model="eagle"), "EagleDecodingConfig"),
])
def test_speculative_configs(opened: Any, spec: SpeculativeInfo, kind: str) -> None:
    ex = opened(speculative=spec)
    assert type(ex._llm.args["speculative_config"]).__name__ == kind
    ex.enqueue(ExecRequest(1, PROMPT, greedy(30)))
    deltas = collect(ex, [1])[1]
    assert tokens_of(deltas) == expected_tokens(MODEL, PROMPT, 30)  # drafts never change it
    assert any(len(d.token_ids) > 1 for d in deltas)  # several tokens in one iteration
    # Iteration stats arrive on their own thread, one iteration at a time, and an iteration
    # may propose drafts that it rejects all of: wait for the first accepted one.
    deadline = time.monotonic() + 5
    while ex.stats().draft_tokens_accepted == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = ex.stats()
    assert 0 < stats.draft_tokens_accepted <= stats.draft_tokens_proposed


def test_llm_arguments_are_those_of_the_pytorch_backend(llmapi: Any, tmp_path: Path) -> None:
    root = make_llmapi_dir(tmp_path, kv_cache_dtype="fp8")
    kwargs = llm_kwargs(llmapi, root, Manifest.load(root), TrtllmConfig(
        capacity_policy="max_utilization", enable_chunked_context=False, kv_fraction=0.7))
    assert "quant_config" not in kwargs and "build_config" not in kwargs
    kv = kwargs["kv_cache_config"]
    assert (kv.enable_block_reuse, kv.free_gpu_memory_fraction, kv.dtype) == (True, 0.7, "fp8")
    assert kwargs["scheduler_config"].capacity_scheduler_policy is \
        llmapi.CapacitySchedulerPolicy.MAX_UTILIZATION
    assert kwargs["enable_chunked_prefill"] is False and kwargs["enable_iter_perf_stats"]
    assert kwargs["model"] == str(root / "ckpt")
    llmapi.LLM(**kwargs).shutdown()  # the fake accepts exactly TorchLlmArgs names
    with pytest.raises(ValueError, match="specific to TensorRT backend"):
        llmapi.LLM(kwargs["model"], quant_config=object())


def test_missing_tensorrt_llm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", None)
    with pytest.raises(RuntimeError, match=r"pypi\.nvidia\.com") as info:
        load_llmapi()
    assert "nvcr.io/nvidia/tensorrt-llm/release:1.2.1" in str(info.value)


def test_probe_uses_the_eos_token(opened: Any) -> None:
    ex = opened()
    probe = engine_of(ex).enqueued[0]
    assert probe.input_token_ids == [EOS] and probe.max_tokens == 1
