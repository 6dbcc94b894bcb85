"""Our manifest, config and requests -> ``tensorrt_llm.LLM`` arguments and ``SamplingParams``.

Every function takes the ``tensorrt_llm.llmapi`` module as ``api``: ``load_llmapi`` is the one
place that imports it. Names and defaults are those of the 1.2 line (``llmapi/llm_args.py``:
``TorchLlmArgs``, ``KvCacheConfig``, ``SchedulerConfig``, the decoding configs;
``sampling_params.py``), and the behaviours that bite are handled here:

- ``LLM`` on the PyTorch backend rejects TensorRT-engine arguments (``quant_config``,
  ``build_config``...): weight quantization comes from the checkpoint's own
  ``hf_quant_config.json`` (a Model Optimizer export), the KV-cache dtype from
  ``KvCacheConfig.dtype``.
- ``SamplingParams.max_tokens`` defaults to 32, and an unset ``end_id`` makes the LLM look for
  a tokenizer: both are always given. Unset temperature, top_k and top_p together mean greedy;
  an unset seed is 0 for every request, so each request gets its own.
- A stop token id ends with ``finish_reason == 'stop'`` and is cut from ``token_ids`` unless
  ``include_stop_str_in_output``; our protocol keeps it in the token ids, so it is set (stop
  strings are matched on our side, as on the ``trtllm`` backend).
- Iteration stats exist only with ``enable_iter_perf_stats=True``.
"""

from __future__ import annotations

import importlib
import random
from pathlib import Path
from typing import Any

from engine_builder.manifest import Manifest, SpeculativeInfo
from server.executor.base import ExecRequest
from server.executor.trtllm.bindings import INSTALL_HINT
from server.executor.trtllm.config import TrtllmConfig
from server.executor.trtllm.request import Remaining, TokenPolicy, stop_words


def load_llmapi() -> Any:
    """``tensorrt_llm.llmapi``, or a clear error where it is not installed."""
    try:
        return importlib.import_module("tensorrt_llm.llmapi")
    except ImportError as exc:
        raise RuntimeError(f"the trtllm-llmapi backend needs tensorrt_llm: {INSTALL_HINT}"
                           ) from exc


def llm_kwargs(api: Any, engine_dir: Path, manifest: Manifest,
               config: TrtllmConfig) -> dict[str, Any]:
    """``LLM(**kwargs)`` for DIR: KV block reuse on, chunked prefill and the capacity policy as
    configured, the engine's limits, iteration stats on, the manifest's drafter."""
    limits = manifest.limits
    policy = getattr(api.CapacitySchedulerPolicy, config.capacity_policy.upper())
    return {
        "model": str(manifest.checkpoint_path(engine_dir)),
        "max_batch_size": limits.max_batch_size,
        "max_num_tokens": limits.max_num_tokens,
        "max_seq_len": limits.max_seq_len,
        "kv_cache_config": api.KvCacheConfig(
            enable_block_reuse=True,
            free_gpu_memory_fraction=config.kv_fractions(with_draft=False).target,
            host_cache_size=config.host_cache_bytes,
            dtype=manifest.quantization.kv_cache_dtype),
        "enable_chunked_prefill": config.enable_chunked_context,
        "scheduler_config": api.SchedulerConfig(
            capacity_scheduler_policy=policy,
            context_chunking_policy=api.ContextChunkingPolicy.FIRST_COME_FIRST_SERVED),
        "speculative_config": speculative_config(api, engine_dir, manifest.speculative),
        "enable_iter_perf_stats": True,
        "iter_stats_max_iterations": config.iter_stats_max_iterations,
    }


def speculative_config(api: Any, engine_dir: Path, spec: SpeculativeInfo | None) -> Any:
    """TensorRT-LLM's drafter config for the manifest's ``speculative`` section (or None)."""
    if spec is None:
        return None
    if spec.mode == "ngram":
        return api.NGramDecodingConfig(max_draft_len=spec.max_draft_len,
                                       max_matching_ngram_size=spec.max_matching_ngram_size,
                                       is_keep_all=True, is_use_oldest=True,
                                       is_public_pool=True)
    assert spec.model is not None
    model = str(Path(engine_dir) / spec.model)
    if spec.mode == "draft_target":
        return api.DraftTargetDecodingConfig(max_draft_len=spec.max_draft_len,
                                             speculative_model_dir=model)
    return api.EagleDecodingConfig(max_draft_len=spec.max_draft_len,
                                   speculative_model_dir=model, eagle3_one_model=True)


def sampling_params(api: Any, request: ExecRequest, left: Remaining,
                    policy: TokenPolicy) -> Any:
    """One request's ``SamplingParams``; the output is token ids only (we detokenize)."""
    p = request.sampling
    greedy = p.temperature == 0.0
    stop_ids = [word[0] for word in stop_words(p, policy) or []]
    return api.SamplingParams(
        max_tokens=left.max_tokens,
        end_id=policy.end_id,
        pad_id=policy.end_id,
        ignore_eos=p.ignore_eos,
        stop_token_ids=stop_ids or None,
        include_stop_str_in_output=True,
        temperature=None if greedy else p.temperature,
        top_k=1 if greedy else (p.top_k or None),  # None: no top-k cut
        top_p=None if greedy else p.top_p,
        seed=p.seed if p.seed is not None else random.getrandbits(63),
        min_tokens=left.min_tokens or None,
        detokenize=False,
        return_perf_metrics=True,
    )


def probe_params(api: Any, policy: TokenPolicy) -> Any:
    """A one-token request, run once at start so the iteration stats report the KV pool."""
    return api.SamplingParams(max_tokens=1, end_id=policy.end_id, pad_id=policy.end_id,
                              top_k=1, detokenize=False)
