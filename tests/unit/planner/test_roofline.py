"""The roofline and the presets: the arithmetic behind the seed's figures."""

from __future__ import annotations

import pytest

from engine_builder.step_cost import StepShape
from server.planner.presets import accelerator, kv_bytes, model_shape, weight_format
from server.planner.roofline import Deployment, Efficiency

pytestmark = pytest.mark.unit


def deploy(model: str = "Llama-3-70B", acc: str = "H100-SXM", tp: int = 4,
           weights: str = "fp16", kv: str = "fp16") -> Deployment:
    return Deployment(accelerator(acc), model_shape(model), weight_format(weights), kv, tp)


def test_parameter_counts_match_the_published_models() -> None:
    assert model_shape("Llama-3-8B").params == pytest.approx(8.03e9, rel=0.002)
    assert model_shape("Llama-3-70B").params == pytest.approx(70.55e9, rel=0.002)


def test_kv_per_request_with_and_without_grouped_query_attention() -> None:
    m = model_shape("Llama-3-70B")
    gqa = m.kv_elements_per_token() * kv_bytes("fp16") * 4096
    assert gqa == pytest.approx(1.34e9, rel=0.01)  # 8 KV heads: 320 KiB a token
    mha = 2 * m.num_layers * m.num_heads * m.head_dim * 2 * 4096
    assert mha == pytest.approx(10.7e9, rel=0.01)  # the seed's "~10 GB": every head cached
    assert deploy(kv="int8").kv_bytes_per_token == gqa / 4096 / 2


def test_the_kv_pool_bounds_the_batch() -> None:
    tight, roomy = deploy(tp=2, acc="A100-80GB"), deploy(tp=8, acc="A100-80GB")
    assert 0 < tight.max_batch_at(4096) < 16 < roomy.max_batch_at(4096)
    assert deploy(tp=2, acc="A100-80GB", weights="int4").max_batch_at(4096) > 4 * 9
    with pytest.raises(ValueError, match="--tp"):
        deploy(tp=1, acc="A100-80GB")  # 141 GB of weights on an 80 GB GPU
    with pytest.raises(ValueError, match="FP8"):
        deploy(acc="A100-80GB", weights="fp8")


def test_a_lone_decode_streams_the_weights_and_a_long_prefill_is_compute_bound() -> None:
    d = deploy(tp=1, model="Llama-3-8B", acc="A100-80GB")
    eff = Efficiency()
    cost = d.step_cost()
    one = StepShape()
    one.add_decode(16)
    weights = d.model.body_params * 2 + d.model.lm_head_params * 2
    assert cost.predict(one) == pytest.approx(
        weights / (2039e9 * eff.bandwidth) + eff.step_overhead_ms / 1000, rel=0.01)
    prefill = StepShape()
    prefill.add_prefill(0, 8192, True)
    flops = 2 * d.model.body_params * 8192
    assert cost.predict(prefill) >= flops / (312e12 * eff.compute)
    assert cost.predict(prefill) < 1.3 * flops / (312e12 * eff.compute)


def test_a_step_never_gets_cheaper_as_it_carries_more() -> None:
    cost = deploy().step_cost()
    shape, last = StepShape(), 0.0
    for i in range(300):
        shape.add_decode(500 + i)
        if i % 7 == 0:
            shape.add_prefill(0, 64, False)
        now = cost.predict(shape)
        assert now >= last
        last = now


def test_decode_gains_taper_where_kv_reads_grow() -> None:
    d = deploy(model="Llama-3-8B", tp=1)
    short = d.decode_tokens_per_s(16, 1024) / d.decode_tokens_per_s(1, 1024)
    long = d.decode_tokens_per_s(16, 8000) / d.decode_tokens_per_s(1, 8000)
    assert 12 < short < 16 and long < short
    mbu, mfu = d.decode_utilization(1, 1024)
    assert 0.5 < mbu <= Efficiency().bandwidth and mfu < 0.01
    assert d.peak_tokens_per_s() >= d.decode_tokens_per_s(32, 1024)
