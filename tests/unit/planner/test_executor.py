"""What the simulated executor does beyond the protocol: static batching, preemption for KV
blocks with a resume from the prefix cache, steps that run ahead, durations from the model."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine_builder.step_cost import FEATURES, LinearStepCost
from server.executor.base import Capacity, ExecRequest, SamplingParams, StepPlan
from server.executor.cpu.drive import Collected, collect
from server.planner.executor import (
    PlanFollowingSimulatedExecutor,
    SimClock,
    SimulatedExecutor,
)

pytestmark = pytest.mark.unit

MODEL = LinearStepCost(0.010, [0.0, 0.001] + [0.0] * (len(FEATURES) - 2))


def cap(**kw: int) -> Capacity:
    base = dict(max_slots=4, num_kv_blocks=256, tokens_per_block=4, max_tokens_per_step=64,
                max_seq_len=512, vocab_size=1000)
    return Capacity(**(base | kw))


def req(rid: int, n: int, max_tokens: int, priority: float = 0.5) -> ExecRequest:
    prompt = tuple(10 + (rid * 13 + i) % 900 for i in range(n))
    return ExecRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                       priority=priority)


def test_steps_last_what_the_model_says() -> None:
    ex = SimulatedExecutor(cap(), MODEL)
    out = collect(ex, [req(1, 20, 5)])
    assert len(out[1].token_ids) == 5
    # A 20-token prefill step, then four one-token decodes.
    assert ex.clock.now == pytest.approx(0.010 + 0.020 + 4 * 0.011)
    assert ex.stats().busy_seconds == pytest.approx(ex.clock.now)


def test_static_batching_admits_a_batch_only_when_the_last_one_is_done() -> None:
    ex = SimulatedExecutor(cap(max_slots=2), MODEL, batching="static")
    for r in (req(1, 3, 2), req(2, 9, 8), req(3, 3, 2)):
        ex.enqueue(r)
    first_token: dict[int, float] = {}
    ended: dict[int, float] = {}
    out: dict[int, Collected] = {}
    while len(ended) < 3:
        for d in ex.poll(1.0):
            out.setdefault(d.request_id, Collected()).add(d, 0.0)
            if d.token_ids:
                first_token.setdefault(d.request_id, ex.clock.now)
            if d.finish is not None:
                ended[d.request_id] = ex.clock.now
    assert first_token[3] > max(ended[1], ended[2])  # waited for request 2, though 1 ended
    samples = ex.take_step_samples()
    assert samples[0].shape.prefill_tokens == 2 * 9  # both prompts padded to the longest
    assert all(s.shape.decode_rows == 2 for s in samples[1:8])  # request 1's row is padding


def test_a_sequence_preempted_for_kv_resumes_its_stream_from_the_prefix_cache() -> None:
    ex = SimulatedExecutor(cap(num_kv_blocks=12), MODEL)  # 48 tokens for 3 sequences of 20+
    requests = [req(i, 12, 12, priority=p) for i, p in ((1, 1.0), (2, 0.0), (3, 0.0))]
    out = collect(ex, requests)
    alone = {r.request_id: collect(SimulatedExecutor(cap(), MODEL), [r])[r.request_id]
             for r in requests}
    stats = ex.stats()
    assert stats.preemptions > 0
    for r in requests:
        assert out[r.request_id].token_ids == alone[r.request_id].token_ids
    assert stats.kv_blocks_cached > 0 and stats.kv_blocks_used == 0
    ex.check_integrity()


def test_plain_decode_steps_run_ahead_into_one_delta_per_request() -> None:
    clock = SimClock()
    ex = SimulatedExecutor(cap(), MODEL, clock=clock)
    ex.enqueue(req(1, 4, 30))
    ex.enqueue(req(2, 4, 30))
    ex.wake()
    for _ in range(2):  # the prefill step, then the first decode: both streams have begun
        end = ex.step_end
        assert end is not None
        clock.now = end
        ex.finish_step()
    ex.poll(0.0)
    start = ex.step_start
    ran = ex.run_ahead(before=start + 10 * 0.012 + 1e-9)
    assert ran == 10  # ten steps of 12 ms fit before the next input
    deltas = ex.poll(0.0)
    assert sorted(len(d.token_ids) for d in deltas) == [10, 10]
    assert ex.run_ahead(before=1e9) == 30 - 1 - 1 - 10 - 1  # stops before the last token
    assert ex.step_end is not None and clock.now < ex.step_end


def test_it_does_not_run_ahead_while_anything_waits() -> None:
    clock = SimClock()
    ex = SimulatedExecutor(cap(max_slots=1), MODEL, clock=clock)
    ex.enqueue(req(1, 4, 30))
    ex.enqueue(req(2, 4, 30))  # waits for the slot
    ex.wake()
    clock.now = ex.step_end or 0.0
    ex.finish_step()
    assert ex.run_ahead(before=1e9) == 0


def _drive(ex: PlanFollowingSimulatedExecutor, clock: SimClock,
           tokens: dict[int, list[float]]) -> None:
    """Runs every step to its end, recording when each request's tokens come out."""
    while ex.step_end is not None:
        clock.now = ex.step_end
        ex.finish_step()
        for d in ex.poll(0.0):
            tokens.setdefault(d.request_id, []).extend([clock.now] * len(d.token_ids))


def test_an_overtaking_prefill_nests_in_the_step_in_flight() -> None:
    """As the CPU executor does: a 40-token prefill step (50 ms) is in flight when a request
    marked overtake arrives at 20 ms; its 20-token prefill (30 ms) runs at once, and the step
    it interrupted ends 30 ms later than it would have."""
    clock = SimClock()
    ex = PlanFollowingSimulatedExecutor(cap(), MODEL, clock=clock)
    ex.enqueue(req(1, 40, 2))
    ex.wake()
    clock.now = 0.020
    ex.enqueue(replace(req(2, 20, 1), overtake=True))
    assert ex.step_end == pytest.approx(0.050)  # not yet: the worker has not looked
    ex.wake()
    assert ex.step_end == pytest.approx(0.050)  # the nested prefill's end
    clock.now = 0.050
    ex.finish_step()
    assert [d.request_id for d in ex.poll(0.0) if d.token_ids] == [2]
    assert ex.step_end == pytest.approx(0.080)  # 30 ms were left of the outer step
    tokens: dict[int, list[float]] = {}
    _drive(ex, clock, tokens)
    assert tokens[1][0] == pytest.approx(0.080)
    ex.check_integrity()


def _overtaken_under_an_interval(
    layers: int | None,
) -> tuple[PlanFollowingSimulatedExecutor, dict[int, list[float]]]:
    """A 60-token prefill (request 1, 2 tokens) under a plan with a 5 ms overtake interval,
    overtaken at 10 ms by request 2 (10 tokens, 4 out); driven to the end: each request's
    token times."""
    clock = SimClock()
    ex = PlanFollowingSimulatedExecutor(cap(), MODEL, clock=clock, layers=layers)
    ex.set_plan(StepPlan(overtake_interval_s=0.005))
    ex.enqueue(req(1, 60, 2))
    ex.wake()
    clock.now = 0.010
    ex.enqueue(replace(req(2, 10, 4), overtake=True))
    ex.wake()
    tokens: dict[int, list[float]] = {}
    _drive(ex, clock, tokens)
    return ex, tokens


def test_overtakers_decode_inside_a_step_planned_with_an_overtake_interval() -> None:
    """A 60-token prefill (70 ms) under a plan with a 5 ms interval; an overtaking request
    arrives at 10 ms: its prefill (20 ms), then a decode (11 ms) every 5 ms of the outer step,
    until its 4 tokens are out, all before the outer step's first token."""
    ex, tokens = _overtaken_under_an_interval(layers=None)
    assert tokens[2] == pytest.approx([0.030, 0.046, 0.062, 0.078])
    # The outer step had 60 ms left at 30 ms and ran 5 ms between the three nested decodes.
    assert tokens[1][0] == pytest.approx(0.078 + 0.060 - 3 * 0.005)
    ex.check_integrity()


def test_overtakers_that_come_during_a_nested_step_wait_for_it_then_nest_together() -> None:
    """As the CPU executor looks for overtakers only between the layers of the outer step: a
    60-token prefill (70 ms) is in flight; request 2 overtakes it at 10 ms (20 tokens, 30 ms);
    requests 3 and 4 come at 20 and 30 ms, while that nested step runs, and nest after it in
    one step of both prefills (10 + 20 ms, not two steps of 20 ms each nesting the other).
    The outer step had 60 ms left and gives its first token after both."""
    clock = SimClock()
    ex = PlanFollowingSimulatedExecutor(cap(), MODEL, clock=clock)
    ex.enqueue(req(1, 60, 2))
    ex.wake()
    for rid, n, t in ((2, 20, 0.010), (3, 10, 0.020), (4, 10, 0.030)):
        clock.now = t
        ex.enqueue(replace(req(rid, n, 1), overtake=True))
        ex.wake()
        assert ex.step_end == pytest.approx(0.040)  # request 2's nested prefill
    tokens: dict[int, list[float]] = {}
    _drive(ex, clock, tokens)
    assert tokens[2] == pytest.approx([0.040])
    assert tokens[3] == tokens[4] == pytest.approx([0.070])
    assert tokens[1][0] == pytest.approx(0.070 + 0.060)
    samples = ex.take_step_samples()
    assert [s.shape.prefill_segments for s in samples[:2]] == [1, 2]
    ex.check_integrity()


def test_overtakers_enqueued_in_one_pass_share_one_nested_step() -> None:
    """Two overtakers enqueued before the executor next looks (one scheduler pass) prefill
    in one nested step: one intercept, not two."""
    clock = SimClock()
    ex = PlanFollowingSimulatedExecutor(cap(), MODEL, clock=clock)
    ex.enqueue(req(1, 60, 2))
    ex.wake()
    clock.now = 0.010
    ex.enqueue(replace(req(2, 5, 1), overtake=True))
    ex.enqueue(replace(req(3, 5, 1), overtake=True))
    ex.wake()
    assert ex.step_end == pytest.approx(0.010 + 0.010 + 0.010)
    tokens: dict[int, list[float]] = {}
    _drive(ex, clock, tokens)
    assert tokens[2] == tokens[3] == pytest.approx([0.030])
    assert tokens[1][0] == pytest.approx(0.030 + 0.060)


def test_overtakers_wait_for_the_layer_in_flight() -> None:
    """The CPU executor looks for overtakers between two layers: with 10 layers, a 60-token
    prefill (70 ms) ends a layer every 7 ms. Request 2 arrives at 10 ms and nests when the
    second layer ends, at 14 ms (20 tokens: 30 ms); request 3, arriving at 12 ms, before
    that step began, joins it (10 + 10 + 20 = 40 ms, one step); the outer step had 56 ms
    left."""
    clock = SimClock()
    ex = PlanFollowingSimulatedExecutor(cap(), MODEL, clock=clock, layers=10)
    ex.enqueue(req(1, 60, 2))
    ex.wake()
    clock.now = 0.010
    ex.enqueue(replace(req(2, 20, 1), overtake=True))
    ex.wake()
    assert ex.step_end == pytest.approx(0.014 + 0.030)
    clock.now = 0.012
    ex.enqueue(replace(req(3, 10, 1), overtake=True))
    ex.wake()
    assert ex.step_end == pytest.approx(0.014 + 0.040)
    tokens: dict[int, list[float]] = {}
    _drive(ex, clock, tokens)
    assert tokens[2] == tokens[3] == pytest.approx([0.054])
    assert tokens[1][0] == pytest.approx(0.054 + 0.056)
    assert [s.shape.prefill_segments for s in ex.take_step_samples()[:2]] == [2, 1]
    ex.check_integrity()


def test_overtakers_nested_decodes_wait_for_the_layer_in_flight_too() -> None:
    """The interval test above with 10 layers of 7 ms: request 2 nests at the 14 ms boundary
    (prefill to 34 ms; the outer step has 56 ms left); each nested decode (11 ms) waits the
    5 ms interval and then for the layer in flight: the outer step's remaining time falls to
    a multiple of 7 ms."""
    ex, tokens = _overtaken_under_an_interval(layers=10)
    # 56 ms left at 34: 7 ms of layer, a decode to 52; 49 left: 7, decode to 70; 42: 7, to 88.
    assert tokens[2] == pytest.approx([0.034, 0.052, 0.070, 0.088])
    assert tokens[1][0] == pytest.approx(0.088 + 0.035)
    ex.check_integrity()


def test_between_two_layers_an_overtakers_prefill_comes_before_their_decode() -> None:
    """The CPU executor's order between two layers of the step in flight: the prefills of
    the overtakers that came, then, in the same gap, a decode of every overtaker if one's last
    token is the interval (10 ms) old; then the next layer. 10 layers of 7 ms: request 2 nests
    at 14 ms (prefill to 34); request 3 comes during it, so it waits for the next layer (41)
    and prefills to 61; by then request 2's token is 27 ms old, so both decode at once (2 rows,
    12 ms, to 73); request 2's last token is 10 ms old two layers later (87, to 98). A
    burst of overtakers therefore cannot hold back the earlier ones' tokens."""
    clock = SimClock()
    ex = PlanFollowingSimulatedExecutor(cap(), MODEL, clock=clock, layers=10)
    ex.set_plan(StepPlan(overtake_interval_s=0.010))
    ex.enqueue(req(1, 60, 2))
    ex.wake()
    for rid, n, t in ((2, 3, 0.010), (3, 2, 0.020)):
        clock.now = t
        ex.enqueue(replace(req(rid, 10, n), overtake=True))
        ex.wake()
    tokens: dict[int, list[float]] = {}
    _drive(ex, clock, tokens)
    assert tokens[2] == pytest.approx([0.034, 0.073, 0.098])
    assert tokens[3] == pytest.approx([0.061, 0.073])
    assert tokens[1][0] == pytest.approx(0.098 + 0.035)  # 70 ms, 63 of nested steps
    ex.check_integrity()


def test_no_overtaker_nests_in_the_lm_head_after_the_last_layer() -> None:
    """A step ends with the LM head over its sampled rows, after its last layer, where the
    CPU executor no longer looks for overtakers. With the head half the weights, a 60-token
    prefill (70 ms, one sampled row: a head of 5.5 ms) has 10 layers of 6.45 ms. An
    overtaker at 60 ms nests when the last layer ends (64.5 ms, 20 ms); one at 66 ms, in the
    head, waits for the step's end and prefills in the next step, with request 1's decode."""
    for arrival, first, outer in ((0.060, 0.0845, 0.090), (0.066, 0.091, 0.070)):
        clock = SimClock()
        ex = PlanFollowingSimulatedExecutor(cap(), MODEL, clock=clock, layers=10,
                                            head_share=0.5)
        ex.enqueue(req(1, 60, 2))
        ex.wake()
        clock.now = arrival
        ex.enqueue(replace(req(2, 10, 1), overtake=True))
        ex.wake()
        tokens: dict[int, list[float]] = {}
        _drive(ex, clock, tokens)
        assert tokens[2] == pytest.approx([first])
        assert tokens[1][0] == pytest.approx(outer)
        ex.check_integrity()


def test_the_head_share_of_the_default_models_shape() -> None:
    """SmolLM2-135M: 30 layers of hidden 576, intermediate 1536, 9 heads and 3 KV heads of
    64, vocabulary 49152; the head is 28.3M of 134.5M weights (measured after the last
    layer: 18-24% of a decode step)."""
    from engine_builder.manifest import Architecture
    from server.planner.profiled import head_share

    arch = Architecture(family="llama", num_layers=30, hidden_size=576, intermediate_size=1536,
                        num_attention_heads=9, num_kv_heads=3, head_dim=64, vocab_size=49152,
                        rope_theta=1e5, rms_norm_eps=1e-5, tie_word_embeddings=True,
                        attention_bias=False, max_position_embeddings=8192)
    assert head_share(arch) == pytest.approx(49152 * 576 / (49152 * 576 + 30 * 3538944))
    assert 0.20 < head_share(arch) < 0.22
