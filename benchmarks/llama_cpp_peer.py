"""llama.cpp as the CPU engine's peer, in process (llama-cpp-python's low-level API) and as a
server (``llama-server``), measured the way Backfill is in benchmarks.bench_quant.

In process: one context with a sequence per batch slot; decode steps are batched
``llama_decode`` calls carrying one token per sequence, logits for every one of them, sampling
excluded (the same fixed token is fed back). Prefill is one ``llama_decode`` of a whole prompt.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def llama_cpp_missing() -> str | None:
    """Why the in-process peer cannot run, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install 'backfill[bench]')"
    return None


class LlamaCppPeer:
    """A llama.cpp context over a GGUF file with ``max_batch`` sequences of ``seq_tokens``."""

    def __init__(self, gguf: Path, threads: int, max_batch: int = 32,
                 seq_tokens: int = 640) -> None:
        import llama_cpp as lc

        self._lc = lc
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)
        lc.llama_log_set(self._quiet, ctypes.c_void_p())
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(),
                                                   lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        params = lc.llama_context_default_params()
        params.n_ctx = max_batch * seq_tokens
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = max_batch
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True
        self.ctx = lc.llama_init_from_model(self.model, params)
        self.batch = lc.llama_batch_init(512, 0, max_batch)
        self.max_batch = max_batch
        self._decoding = (0, 0)  # (sequences, next position) of the decode under way

    @property
    def weight_bytes(self) -> int:
        return int(self._lc.llama_model_size(self.model))

    def close(self) -> None:
        self._lc.llama_batch_free(self.batch)
        self._lc.llama_free(self.ctx)
        self._lc.llama_model_free(self.model)

    def _decode(self, tokens: list[int], positions: list[int], seqs: list[int],
                logits: list[bool]) -> None:
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (tok, pos, seq, want) in enumerate(zip(tokens, positions, seqs, logits,
                                                      strict=True)):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        rc = self._lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _reset(self) -> None:
        self._lc.llama_memory_clear(self._lc.llama_get_memory(self.ctx), True)

    def decode_rate(self, batch: int, steps: int, prompt_len: int = 32) -> float:
        """Aggregate decode tokens/s of `batch` sequences, from the median of `steps` steps."""
        self.start_decode(batch, prompt_len)
        times = []
        for _ in range(steps + 1):  # the first step warms up
            t0 = time.perf_counter()
            self.decode_step()
            times.append(time.perf_counter() - t0)
        return batch / float(np.median(times[1:]))

    def start_decode(self, batch: int, prompt_len: int = 32) -> None:
        """Prefills `batch` random prompts (one sequence per call) for ``decode_step``."""
        rng = np.random.default_rng(batch)
        self._reset()
        for seq in range(batch):
            prompt = [int(t) for t in rng.integers(100, 40_000, prompt_len)]
            self._decode(prompt, list(range(prompt_len)), [seq] * prompt_len,
                         [False] * (prompt_len - 1) + [True])
        self._decoding = (batch, prompt_len)

    def decode_step(self) -> None:
        """One batched decode step of the sequences ``start_decode`` began."""
        batch, position = self._decoding
        self._decode([100 + s for s in range(batch)], [position] * batch, list(range(batch)),
                     [True] * batch)
        self._decoding = (batch, position + 1)

    def prefill_rate(self, num_tokens: int) -> float:
        """Prompt tokens/s of one `num_tokens` prompt (one llama_decode call)."""
        rng = np.random.default_rng(num_tokens)
        best = float("inf")
        for _ in range(2):
            self._reset()
            prompt = [int(t) for t in rng.integers(100, 40_000, num_tokens)]
            t0 = time.perf_counter()
            self._decode(prompt, list(range(num_tokens)), [0] * num_tokens,
                         [False] * (num_tokens - 1) + [True])
            best = min(best, time.perf_counter() - t0)
        return num_tokens / best


class LlamaServer:
    """``llama-server`` as a child process: `parallel` slots, continuous batching."""

    def __init__(self, binary: str, gguf: Path, *, threads: int, parallel: int, port: int,
                 seq_tokens: int = 512, log_path: Path | None = None) -> None:
        if shutil.which(binary) is None:
            raise FileNotFoundError(binary)
        self.url = f"http://127.0.0.1:{port}"
        log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, "-m", str(gguf), "-np", str(parallel), "-t", str(threads),
             "-tb", str(threads), "-c", str(parallel * seq_tokens), "-cb", "--host", "127.0.0.1",
             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        self._wait_healthy()

    def _wait_healthy(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("llama-server did not become healthy")

    def chat(self, content: str, max_tokens: int) -> int:
        """One chat request, EOS ignored; returns the completion tokens it reports."""
        body: dict[str, Any] = {"messages": [{"role": "user", "content": content}],
                                "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
        req = urllib.request.Request(self.url + "/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return int(json.loads(r.read())["usage"]["completion_tokens"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
