"""CpuExecutor behaviour on the tiny engine: batching, prefix cache, sampling, resume, stops,
cancel, preemption and input validation."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from server.executor.base import ExecRequest, Executor, FinishReason, SamplingParams
from server.executor.cpu import CpuExecutor
from server.executor.cpu.drive import Collected, collect

pytestmark = pytest.mark.unit
Factory = Callable[..., Path]


@pytest.fixture
def open_executor() -> Iterator[Callable[[Path], CpuExecutor]]:
    opened: list[CpuExecutor] = []

    def make(engine: Path) -> CpuExecutor:
        opened.append(CpuExecutor.open(engine))
        return opened[-1]

    yield make
    for ex in opened:
        ex.shutdown()


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(lo, hi, size=n)
    return [tuple(int(t) for t in rng.integers(3, 290, size=size)) for size in sizes]


def _req(rid: int, prompt: tuple[int, ...], **sampling: object) -> ExecRequest:
    params = {"max_tokens": 12, "ignore_eos": True, **sampling}
    return ExecRequest(rid, prompt, SamplingParams(**params))  # type: ignore[arg-type]


def _alone(ex: Executor, requests: list[ExecRequest]) -> dict[int, Collected]:
    return {r.request_id: collect(ex, [r])[r.request_id] for r in requests}


def _staggered(ex: Executor, requests: list[ExecRequest], per: int = 3) -> dict[int, Collected]:
    results: dict[int, Collected] = {}
    for i in range(0, len(requests), per):
        for r in requests[i : i + per]:
            ex.enqueue(r)
            results[r.request_id] = Collected()
        for delta in ex.poll(0.005):
            results[delta.request_id].add(delta, 0.0)
    return collect(ex, results=results)


def _assert_idle(ex: CpuExecutor) -> None:
    stats = ex.stats()
    assert (stats.active, stats.queued, stats.kv_blocks_used) == (0, 0, 0)
    assert stats.kv_blocks_free + stats.kv_blocks_cached == stats.kv_blocks_total
    ex.check_integrity()


def test_greedy_is_batch_invariant_with_staggered_arrivals(
    tiny_engine_factory: Factory, open_executor: Callable[[Path], CpuExecutor]
) -> None:
    requests = [_req(i, p) for i, p in enumerate(_prompts(16))]
    alone = _alone(open_executor(tiny_engine_factory()), requests)
    # Few slots and a small token budget: queueing, chunked prefill and mixed steps.
    small = open_executor(tiny_engine_factory(max_batch_size=5, max_num_tokens=24))
    together = _staggered(small, requests)
    for r in requests:
        assert together[r.request_id].token_ids == alone[r.request_id].token_ids
        assert together[r.request_id].text == alone[r.request_id].text
        assert together[r.request_id].finish is FinishReason.LENGTH
        assert len(together[r.request_id].token_ids) == 12
    assert small.stats().steps < sum(len(r.prompt_token_ids) + 12 for r in requests)
    _assert_idle(small)


def test_prefix_cache_hit_matches_cold_run_and_skips_cached_blocks(
    tiny_engine: Path, open_executor: Callable[[Path], CpuExecutor]
) -> None:
    shared = _prompts(1, seed=5, lo=40, hi=41)[0]  # 40 tokens: two full blocks + 8
    first, second = shared, (*shared[:32], 7, 8, 9, 10, 11)
    cold = collect(open_executor(tiny_engine), [_req(1, second)])[1]
    assert cold.cached_prompt_tokens == 0
    ex = open_executor(tiny_engine)
    collect(ex, [_req(1, first)])
    before = ex.counters
    warm = collect(ex, [_req(2, second)])[2]
    after = ex.counters
    assert warm.token_ids == cold.token_ids and warm.text == cold.text
    assert warm.cached_prompt_tokens == 32
    assert after.computed_tokens - before.computed_tokens == len(second) - 32 + 11
    assert ex.stats().cached_prompt_tokens == 32
    assert ex.stats().prompt_tokens == len(first) + len(second)
    _assert_idle(ex)


def test_seeded_sampling_is_reproducible_and_batch_independent(
    tiny_engine: Path, open_executor: Callable[[Path], CpuExecutor]
) -> None:
    ex = open_executor(tiny_engine)
    prompt = _prompts(1, seed=9)[0]
    params = {"temperature": 1.0, "top_k": 50, "top_p": 0.9, "seed": 1234, "max_tokens": 16}
    a = collect(ex, [_req(1, prompt, **params)])[1].token_ids
    b = collect(ex, [_req(2, prompt, **params)])[2].token_ids
    mates = [_req(10 + i, p, temperature=1.0) for i, p in enumerate(_prompts(6, seed=1))]
    c = collect(ex, [*mates[:3], _req(3, prompt, **params), *mates[3:]])[3].token_ids
    assert a == b == c
    others = [collect(ex, [_req(20 + s, prompt, **{**params, "seed": s})])[20 + s].token_ids
              for s in range(3)]
    assert any(o != a for o in others)
    greedy = collect(ex, [_req(30, prompt, max_tokens=16)])[30].token_ids
    assert a != greedy  # temperature 1 over a random model does not collapse to argmax


def test_resume_continues_the_uninterrupted_stream(
    tiny_engine: Path, open_executor: Callable[[Path], CpuExecutor]
) -> None:
    ex = open_executor(tiny_engine)
    prompt = _prompts(1, seed=11, lo=30, hi=31)[0]
    params = {"temperature": 0.8, "seed": 77, "max_tokens": 24}
    full = collect(ex, [_req(1, prompt, **params)])[1]
    # Preemption as the scheduler does it: cancel mid-stream, re-enqueue with what came out.
    ex.enqueue(_req(2, prompt, **params))
    part = Collected()
    while part.finish is None:
        for delta in ex.poll(0.5):
            part.add(delta, 0.0)
            if len(part.token_ids) >= 5 and part.finish is None:
                ex.cancel(2)
    assert part.finish is FinishReason.CANCELLED
    assert 5 <= len(part.token_ids) < 24
    resumed = ExecRequest(3, prompt, SamplingParams(**params, ignore_eos=True),  # type: ignore[arg-type]
                          resume_token_ids=tuple(part.token_ids))
    rest = collect(ex, [resumed])[3]
    assert part.token_ids + rest.token_ids == full.token_ids
    assert part.text + rest.text == full.text
    assert rest.finish is FinishReason.LENGTH
    assert rest.cached_prompt_tokens is not None and rest.cached_prompt_tokens > 0


def test_stop_token_ids_min_tokens_and_max_tokens(
    tiny_engine: Path, open_executor: Callable[[Path], CpuExecutor]
) -> None:
    ex = open_executor(tiny_engine)
    prompt = _prompts(1, seed=13)[0]
    base = collect(ex, [_req(1, prompt, max_tokens=30)])[1]
    assert len(base.token_ids) == 30 and base.finish is FinishReason.LENGTH
    stop_id = base.token_ids[3]
    first = base.token_ids.index(stop_id)
    stopped = collect(ex, [_req(2, prompt, max_tokens=30, stop_token_ids=(stop_id,))])[2]
    assert stopped.finish is FinishReason.STOP
    assert stopped.token_ids == base.token_ids[: first + 1]  # the stop id is reported
    held = collect(ex, [_req(3, prompt, max_tokens=30, stop_token_ids=(stop_id,),
                             min_tokens=first + 3)])[3]
    assert stop_id not in held.token_ids[: first + 3]
    assert len(held.token_ids) >= first + 3
    short = collect(ex, [_req(4, prompt, max_tokens=3)])[4]
    assert short.token_ids == base.token_ids[:3] and short.finish is FinishReason.LENGTH


def test_eos_stops_unless_ignored(
    tiny_engine: Path, open_executor: Callable[[Path], CpuExecutor]
) -> None:
    ex = open_executor(tiny_engine)
    eos = ex.tokenizer.eos_token_ids
    prompt = _prompts(1, seed=2)[0]
    # Sampling at high temperature over a 292-token vocab hits an EOS id within 2000 draws.
    hit = collect(ex, [_req(1, prompt, temperature=5.0, seed=3, max_tokens=2000,
                            ignore_eos=False)])[1]
    assert hit.finish is FinishReason.STOP and hit.token_ids[-1] in eos
    assert not set(hit.token_ids[:-1]) & set(eos)
    longer = len(hit.token_ids) + 2
    ignored = collect(ex, [_req(2, prompt, temperature=5.0, seed=3, max_tokens=longer)])[2]
    assert ignored.finish is FinishReason.LENGTH
    assert ignored.token_ids[: len(hit.token_ids)] == hit.token_ids


def test_stop_string_cuts_output_and_never_leaks_its_start(
    tiny_engine: Path, open_executor: Callable[[Path], CpuExecutor]
) -> None:
    ex = open_executor(tiny_engine)
    prompt = _prompts(1, seed=21)[0]
    base = collect(ex, [_req(1, prompt, max_tokens=40)])[1]
    ascii_pos = [i for i in range(8, len(base.text) - 2) if base.text[i : i + 3].isprintable()]
    assert ascii_pos, base.text
    stop = base.text[ascii_pos[0] : ascii_pos[0] + 3]
    cut = base.text.find(stop)
    ex.enqueue(_req(2, prompt, max_tokens=40, stop=("zzzzzz", stop)))
    got = collect(ex, results={2: Collected()})[2]
    assert got.finish is FinishReason.STOP
    assert got.text == base.text[:cut]
    assert got.token_ids == base.token_ids[: len(got.token_ids)]


def test_max_seq_len_ends_with_length(
    tiny_engine_factory: Factory, open_executor: Callable[[Path], CpuExecutor]
) -> None:
    ex = open_executor(tiny_engine_factory(max_seq_len=64))
    got = collect(ex, [_req(1, tuple(range(3, 63)), max_tokens=50)])[1]
    assert got.finish is FinishReason.LENGTH and len(got.token_ids) == 4


def test_cancel_running_and_queued_frees_slots_and_blocks(
    tiny_engine_factory: Factory, open_executor: Callable[[Path], CpuExecutor]
) -> None:
    ex = open_executor(tiny_engine_factory(max_batch_size=1))
    p1, p2 = _prompts(2, seed=4)
    ex.enqueue(_req(1, p1, max_tokens=100_000 // 100))
    ex.enqueue(_req(2, p2))
    got: dict[int, Collected] = {1: Collected(), 2: Collected()}
    while not got[1].token_ids:
        for delta in ex.poll(0.5):
            got[delta.request_id].add(delta, 0.0)
    with ex._step_lock:  # request 1 cannot run to its end before the cancels
        assert ex.stats().active == 1 and ex.stats().queued == 1
        ex.cancel(2)
        ex.cancel(1)
        ex.cancel(12345)  # unknown: a no-op
    collect(ex, results=got)
    assert got[1].finish is FinishReason.CANCELLED and got[2].finish is FinishReason.CANCELLED
    assert got[2].token_ids == [] and len(got[1].token_ids) < 1000
    _assert_idle(ex)
    ex.cancel(1)  # finished: a no-op
    assert ex.poll(0.05) == []
    again = collect(ex, [_req(1, p1)])[1]  # the id is free again
    assert again.finish is FinishReason.LENGTH


def test_kv_exhaustion_preempts_and_recomputes_without_changing_outputs(
    tiny_engine_factory: Factory, open_executor: Callable[[Path], CpuExecutor]
) -> None:
    requests = [_req(i, p, max_tokens=30) for i, p in enumerate(_prompts(6, seed=8, lo=18, hi=22))]
    alone = _alone(open_executor(tiny_engine_factory()), requests)
    tight = open_executor(tiny_engine_factory(num_kv_blocks=12, max_batch_size=8, max_seq_len=192))
    together = collect(tight, requests)
    for r in requests:
        assert together[r.request_id].token_ids == alone[r.request_id].token_ids
        assert together[r.request_id].text == alone[r.request_id].text
    assert tight.stats().preemptions > 0
    _assert_idle(tight)


def test_slow_poller_gets_coalesced_deltas(
    tiny_engine: Path, open_executor: Callable[[Path], CpuExecutor]
) -> None:
    ex = open_executor(tiny_engine)
    ex.enqueue(_req(1, _prompts(1)[0], max_tokens=20))
    deadline = time.monotonic() + 30
    while (stats := ex.stats()).active or stats.queued:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    deltas = ex.poll(0.0)
    assert len(deltas) == 1
    assert len(deltas[0].token_ids) == 20 and deltas[0].finish is FinishReason.LENGTH
    assert deltas[0].cached_prompt_tokens == 0


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (ExecRequest(1, ()), "empty"),
        (ExecRequest(1, tuple([5] * 2048)), "max_seq_len"),
        (ExecRequest(1, (5, 292)), "vocabulary"),
        (ExecRequest(1, (5, -1)), "vocabulary"),
        (ExecRequest(1, (5,), resume_token_ids=(999,)), "vocabulary"),
    ],
)
def test_bad_requests_raise_value_error(
    tiny_engine: Path,
    open_executor: Callable[[Path], CpuExecutor],
    request_: ExecRequest,
    match: str,
) -> None:
    ex = open_executor(tiny_engine)
    with pytest.raises(ValueError, match=match):
        ex.enqueue(request_)
    assert ex.stats().queued == 0


def test_duplicate_live_id_raises_and_shutdown_cancels(
    tiny_engine: Path, open_executor: Callable[[Path], CpuExecutor]
) -> None:
    ex = open_executor(tiny_engine)
    ex.enqueue(_req(1, (5, 6, 7), max_tokens=1000))
    with pytest.raises(ValueError, match="already live"):
        ex.enqueue(_req(1, (5, 6, 7)))
    ex.shutdown()
    ex.shutdown()
    deltas = ex.poll(0.0)
    assert [d.finish for d in deltas] == [FinishReason.CANCELLED]
    with pytest.raises(ValueError, match="shut down"):
        ex.enqueue(_req(2, (5,)))


def test_reused_id_is_not_merged_into_the_previous_final_delta(
    tiny_engine: Path, open_executor: Callable[[Path], CpuExecutor]
) -> None:
    ex = open_executor(tiny_engine)

    def run_unpolled(prompt: tuple[int, ...]) -> None:
        ex.enqueue(_req(1, prompt, max_tokens=3))
        deadline = time.monotonic() + 30
        while ex.stats().active or ex.stats().queued or ex.stats().generated_tokens % 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)

    run_unpolled((5, 6, 7))
    run_unpolled((8, 9))
    deltas = ex.poll(0.0)
    assert [(d.request_id, len(d.token_ids), d.finish) for d in deltas] == [
        (1, 3, FinishReason.LENGTH),
        (1, 3, FinishReason.LENGTH),
    ]


@pytest.mark.parametrize(
    "variant",
    [{"quant": "int8"}, {"quant": "int4"}, {"kv_cache_dtype": "int8"}],
    ids=["int8", "int4", "int8-kv"],
)
def test_quantized_engines_generate_through_the_executor(
    tiny_engine_factory: Factory,
    open_executor: Callable[[Path], CpuExecutor],
    variant: dict[str, str],
) -> None:
    ex = open_executor(tiny_engine_factory(**variant))
    requests = [_req(i, p, max_tokens=10) for i, p in enumerate(_prompts(4, seed=30))]
    got = collect(ex, requests)
    assert all(len(c.token_ids) == 10 and c.finish is FinishReason.LENGTH for c in got.values())
    _assert_idle(ex)


def test_prefix_shared_with_a_running_sequence(
    tiny_engine: Path, open_executor: Callable[[Path], CpuExecutor]
) -> None:
    ex = open_executor(tiny_engine)
    prompt = _prompts(1, seed=40, lo=40, hi=41)[0]
    got: dict[int, Collected] = {}
    ex.enqueue(_req(1, prompt, max_tokens=40))
    got[1] = Collected()
    while not got[1].token_ids:  # request 1 finished its prefill and holds its blocks
        for delta in ex.poll(0.5):
            got[1].add(delta, 0.0)
    collect(ex, [_req(2, prompt, max_tokens=40)], results=got)
    assert got[2].cached_prompt_tokens == 32
    assert got[2].token_ids == got[1].token_ids
    _assert_idle(ex)


def test_the_worker_warms_the_engine_up_and_forgets_it(
    tiny_engine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps run before the constructor returns (the first request would otherwise pay for
    loading kernels and faulting in weights), and leave nothing behind: no counts, samples
    or cached blocks, and the same outputs as an executor that did not warm up."""
    from engine_builder.manifest import Manifest
    from server.executor.cpu.model import ForwardPass
    from server.executor.cpu.open import build_engine

    layers: list[int] = []
    original = ForwardPass.advance

    def advance(self: ForwardPass) -> None:
        layers.append(1)
        original(self)

    monkeypatch.setattr(ForwardPass, "advance", advance)
    warm = CpuExecutor.open(tiny_engine)
    cold = CpuExecutor(*build_engine(tiny_engine, Manifest.load(tiny_engine)), warm_up=False)
    try:
        assert layers, "no step ran before the first request"
        stats = warm.stats()
        assert (stats.steps, stats.prompt_tokens, stats.generated_tokens, stats.busy_seconds,
                stats.kv_blocks_used, stats.kv_blocks_cached) == (0, 0, 0, 0.0, 0, 0)
        assert warm.take_step_samples() == []
        requests = [_req(i, p, max_tokens=6) for i, p in enumerate(_prompts(3, seed=11))]
        ours, theirs = collect(warm, requests), collect(cold, requests)
        assert {k: v.token_ids for k, v in ours.items()} == \
            {k: v.token_ids for k, v in theirs.items()}
        assert warm.stats().prompt_tokens == sum(len(r.prompt_token_ids) for r in requests)
    finally:
        warm.shutdown()
        cold.shutdown()
