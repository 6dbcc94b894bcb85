"""Sampling on the trtllm backend: every knob sent explicitly, since TensorRT-LLM turns an
unset top_k and top_p into greedy decoding (``regularizeTopKTopP``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.executor.base import ExecRequest, SamplingParams
from tests.unit.trtllm.conftest import make_engine_dir
from tests.unit.trtllm.fake_model import FakeModel
from tests.unit.trtllm.helpers import collect, expected_tokens, open_plain, tokens_of

pytestmark = pytest.mark.unit

PROMPT = (104, 105, 32, 116, 104, 101, 114, 101)
GREEDY = expected_tokens(FakeModel(vocab_size=257), PROMPT, 16)


@pytest.fixture
def plain(bindings: Any, tmp_path: Path) -> Any:
    ex, engine = open_plain(bindings, make_engine_dir(tmp_path))
    yield ex, engine
    ex.shutdown()


def run(ex: Any, rid: int, sampling: SamplingParams) -> list[int]:
    ex.enqueue(ExecRequest(rid, PROMPT, sampling))
    return tokens_of(collect(ex, [rid])[rid])


def test_temperature_alone_samples(plain: Any) -> None:
    ex, engine = plain
    outputs = [run(ex, seed, SamplingParams(temperature=0.8, max_tokens=16, seed=seed))
               for seed in (1, 2, 3)]
    sent = engine.enqueued[0].sampling_config
    assert (sent.top_k, sent.top_p, sent.temperature) == (0, 1.0, 0.8)  # explicit, not unset
    assert len({tuple(o) for o in outputs}) == 3  # different seeds, different text
    assert all(o != GREEDY for o in outputs)


def test_a_seed_reproduces_its_sample(plain: Any) -> None:
    ex, _ = plain
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=7)
    assert run(ex, 1, sampling) == run(ex, 2, sampling) != GREEDY


def test_unseeded_requests_get_seeds_of_their_own(plain: Any) -> None:
    ex, engine = plain
    first = run(ex, 1, SamplingParams(temperature=1.0, max_tokens=16))
    second = run(ex, 2, SamplingParams(temperature=1.0, max_tokens=16))
    seeds = [r.sampling_config.seed for r in engine.enqueued]
    assert None not in seeds and seeds[0] != seeds[1]  # unset would be 0 for both
    assert first != second


def test_top_k_one_and_temperature_zero_are_greedy(plain: Any) -> None:
    ex, _ = plain
    assert run(ex, 1, SamplingParams(temperature=0.0, max_tokens=16, seed=5)) == GREEDY
    assert run(ex, 2, SamplingParams(temperature=0.9, top_k=1, max_tokens=16, seed=5)) == GREEDY
