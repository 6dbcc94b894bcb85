"""The fake in-flight batching engine behind ``Executor`` (semantics: see fake_bindings.py)."""

from __future__ import annotations

import datetime
import itertools
import json
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.unit.trtllm import fake_model
from tests.unit.trtllm.fake_engine_step import Drafter, EngineLimits, EngineSeq, Stepper
from tests.unit.trtllm.fake_model import FakeModel, Sampling, regularize_top_k_top_p
from tests.unit.trtllm.fake_types import (
    ExecutorConfig,
    IterationStats,
    KvCacheStats,
    ModelType,
    Request,
    Response,
)

DEFAULT_KV_FRACTION = 0.9  # KvCacheConfig::kDefaultGpuMemFraction
SPEC_MODE_NONE = 1  # SpeculativeDecodingMode.NONE
SPEC_MODE_DRAFT_TOKENS_EXTERNAL = 2  # an IntFlag: 1 << 1 (8 is LOOKAHEAD_DECODING)


def write_engine_config(engine_dir: Path, *, vocab_size: int = 300, max_batch_size: int = 4,
                        max_num_tokens: int = 256, max_seq_len: int = 128,
                        max_draft_len: int = 0, tokens_per_block: int = 32,
                        fake: dict[str, Any] | None = None) -> None:
    """A config.json shaped like trtllm-build's (pretrained_config / build_config)."""
    engine_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "version": "1.2.1",
        "pretrained_config": {"architecture": "LlamaForCausalLM", "vocab_size": vocab_size},
        "build_config": {
            "max_batch_size": max_batch_size, "max_num_tokens": max_num_tokens,
            "max_seq_len": max_seq_len, "max_input_len": max_seq_len - 1,
            "max_draft_len": max_draft_len,
            "speculative_decoding_mode": (SPEC_MODE_DRAFT_TOKENS_EXTERNAL if max_draft_len
                                          else SPEC_MODE_NONE),
            "plugin_config": {"tokens_per_block": tokens_per_block,
                              "use_paged_context_fmha": True, "paged_kv_cache": True},
        },
        "fake": fake or {},
    }
    (engine_dir / "config.json").write_text(json.dumps(config))


def _shutdown_error(what: str = "") -> RuntimeError:
    # TLLM_CHECK_WITH_INFO(!mShutdownCalled, "Shutdown called") in executorImpl.cpp
    return RuntimeError(f"[TensorRT-LLM][ERROR] Assertion failed: Shutdown called{what}")


class Executor(Stepper):
    """``Executor(model_path, model_type, executor_config)`` over a fake engine directory."""

    def __init__(self, model_path: str | Path, model_type: ModelType,
                 executor_config: ExecutorConfig) -> None:
        config_path = Path(model_path) / "config.json"
        if not config_path.is_file():
            raise RuntimeError(f"[TensorRT-LLM][ERROR] Failed to open {config_path}")
        raw = json.loads(config_path.read_text())
        build = raw["build_config"]
        fake = raw.get("fake", {})
        model_keys = {"low", "high", "salt", "eos_every", "perturb_every"}
        model = FakeModel(vocab_size=raw["pretrained_config"]["vocab_size"],
                          **{k: v for k, v in fake.items() if k in model_keys})
        limits = EngineLimits(
            max_batch_size=min(executor_config.max_batch_size or build["max_batch_size"],
                               build["max_batch_size"]),
            max_num_tokens=executor_config.max_num_tokens or build["max_num_tokens"],
            max_seq_len=build["max_seq_len"], max_input_len=build["max_input_len"],
            max_draft_len=build.get("max_draft_len", 0),
            tokens_per_block=build["plugin_config"]["tokens_per_block"],
            num_blocks=fake.get("num_blocks", 64))
        self._start(model, limits, executor_config, model_type=model_type,
                    weight_blocks=fake.get("weight_blocks", 0),
                    fail_at_context_len=fake.get("fail_at_context_len"))

    @classmethod
    def for_model(cls, model: FakeModel, limits: EngineLimits, config: ExecutorConfig, *,
                  weight_blocks: int = 0, fail_at_context_len: int | None = None,
                  drafter: Drafter | None = None) -> Executor:
        """Test-only constructor (the fake LLM API runs its model on this engine)."""
        engine = cls.__new__(cls)
        engine._start(model, limits, config, model_type=ModelType.DECODER_ONLY,
                      weight_blocks=weight_blocks, fail_at_context_len=fail_at_context_len,
                      drafter=drafter)
        return engine

    def _start(self, model: FakeModel, limits: EngineLimits, config: ExecutorConfig, *,
               model_type: ModelType, weight_blocks: int, fail_at_context_len: int | None,
               drafter: Drafter | None = None) -> None:
        kv = config.kv_cache_config
        cap = limits.num_blocks
        if kv.max_tokens is not None:
            cap = min(cap, kv.max_tokens // limits.tokens_per_block)
        fraction = kv.free_gpu_memory_fraction
        device = fake_model.DEVICE
        num_blocks = device.allocate(weight_blocks, DEFAULT_KV_FRACTION if fraction is None
                                     else fraction, cap)
        # The KV pool and the weights go back to the device when this object is destroyed.
        weakref.finalize(self, device.release, weight_blocks + num_blocks)
        self.model = model
        self.drafter = drafter
        self.fail_at_context_len = fail_at_context_len
        self.limits = EngineLimits(**{**limits.__dict__, "num_blocks": num_blocks})
        self.model_type = model_type
        self.config = config
        self.enqueued: list[Request] = []  # test introspection: every accepted request
        self.cancel_calls: list[int] = []
        self._lock = threading.Condition()
        self._ids = itertools.count(1)  # executorImpl.cpp: mLastReqId = 1, per executor
        self._arrivals = itertools.count()
        self._queue: list[EngineSeq] = []
        self._active: list[EngineSeq] = []
        self._known: dict[int, EngineSeq] = {}
        self._responses: list[Response] = []
        self._stats: list[IterationStats] = []
        self._iter = 0
        self._cached_prefixes: set[tuple[int, ...]] = set()
        self._totals = KvCacheStats()
        self._paused = False
        self._pause_in: int | None = None  # iterations left before pause_after pauses
        self._shutdown = False
        self._thread = threading.Thread(target=self._loop, name="fake-trtllm", daemon=True)
        self._thread.start()

    # -- API ------------------------------------------------------------------------------

    def enqueue_request(self, request: Request) -> int:
        with self._lock:
            if self._shutdown:
                raise _shutdown_error(", cannot enqueue requests")
            limit = self.config.max_queue_size
            if limit is not None and limit > 0 and len(self._queue) >= limit:
                raise RuntimeError(f"[TensorRT-LLM][ERROR] Maximum queue size of {limit} "
                                   "has been reached, please try again later")
            if not request.input_token_ids:
                raise RuntimeError("[TensorRT-LLM][ERROR] Input length is 0")
            engine_id = next(self._ids)
            sc = request.sampling_config
            k, p = regularize_top_k_top_p(sc.top_k, sc.top_p)
            sampling = Sampling(top_k=k, top_p=p,
                                temperature=sc.temperature or fake_model.DEFAULT_TEMPERATURE,
                                seed=fake_model.DEFAULT_SEED if sc.seed is None else sc.seed)
            seq = EngineSeq(engine_id, request, next(self._arrivals), request.input_token_ids,
                       len(request.input_token_ids), sampling)
            self.enqueued.append(request)
            self._known[engine_id] = seq
            self._queue.append(seq)
            self._lock.notify_all()
            return engine_id

    def enqueue_requests(self, requests: Sequence[Request]) -> list[int]:
        return [self.enqueue_request(r) for r in requests]

    def await_responses(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The three overloads: ``(timeout=None)``, ``(id, timeout=None)``, ``(ids, timeout)``."""
        target: int | list[int] | None = kwargs.pop("id", kwargs.pop("ids", None))
        timeout = kwargs.pop("timeout", None)
        if args and isinstance(args[0], (int, list)):
            target, args = args[0], args[1:]
        if args:
            timeout = args[0]
        if timeout is not None and not isinstance(timeout, datetime.timedelta):
            raise TypeError("await_responses(): timeout must be a datetime.timedelta")
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        with self._lock:
            if self._shutdown:
                raise _shutdown_error()
            while True:
                ready = self._take(target)
                if ready or self._shutdown:  # a waiter wakes when shutdown begins
                    return ready
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return ready
                self._lock.wait(left)

    def get_num_responses_ready(self, id: int | None = None) -> int:
        with self._lock:
            if self._shutdown:
                raise _shutdown_error()
            return sum(1 for r in self._responses if id is None or r.request_id == id)

    def cancel_request(self, id: int) -> None:
        with self._lock:
            if self._shutdown:
                raise _shutdown_error()
            self.cancel_calls.append(id)
            seq = self._known.get(id)
            if seq is not None:  # unknown or finished ids are a no-op
                seq.cancelled = True
                self._lock.notify_all()

    def get_latest_iteration_stats(self) -> list[IterationStats]:
        with self._lock:
            if self._shutdown:
                raise _shutdown_error()
            out, self._stats = self._stats, []
            return out

    def get_latest_request_stats(self) -> list[Any]:
        with self._lock:
            if self._shutdown:
                raise _shutdown_error()
        return []  # request stats are off by default (request_stats_max_iterations = 0)

    def can_enqueue_requests(self) -> bool:
        return not self._shutdown

    def shutdown(self) -> None:
        with self._lock:
            self._shutdown = True
            self._lock.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    # -- test controls (not in the real API) ---------------------------------------------

    def pause(self) -> None:
        """Stops iterations, so a test can build up a queue deterministically."""
        with self._lock:
            self._paused = True

    def pause_after(self, iterations: int) -> None:
        """Pauses once ``iterations`` more iterations have run, so a test can stop the engine
        with a request certainly mid-run (``pause_after(1)`` before the first enqueue: that
        request holds still with its first token out)."""
        with self._lock:
            self._pause_in = iterations

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    @property
    def queued_ids(self) -> list[int]:
        with self._lock:
            return [s.engine_id for s in self._queue]

    # -- the loop -------------------------------------------------------------------------

    def _take(self, target: int | list[int] | None) -> list[Any]:
        if isinstance(target, list):
            return [self._take(t) for t in target]
        taken = [r for r in self._responses if target is None or r.request_id == target]
        self._responses = [r for r in self._responses if r not in taken]
        return taken

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._shutdown and (self._paused or not (self._queue or self._active)):
                    self._lock.wait()
                if self._shutdown:
                    return
                self._step()
                self._count_down()
                self._lock.notify_all()
            time.sleep(0.001)  # an "iteration" takes time, so cancels can land in between

    def _count_down(self) -> None:
        """After an iteration, under the lock: pause_after's countdown."""
        if self._pause_in is not None:
            self._pause_in -= 1
            if self._pause_in <= 0:
                self._paused, self._pause_in = True, None
