"""The capacity planner's roofline against a real GPU: a decoder's step times, measured and
predicted side by side.

The planner predicts a GPU's step from the bytes it moves and the FLOPs it does
(server/planner/roofline.py). This runs the same step shapes on the GPU at hand: a
Llama-shaped decoder in PyTorch (random FP16 weights, grouped-query attention through
``scaled_dot_product_attention``, a contiguous KV cache, greedy sampling through the LM head),
every step captured once in a CUDA graph and replayed, so what is timed is the kernels, not
Python. It is not TensorRT-LLM: what it reaches of the silicon is a floor for an optimized
engine, and it says which part of the roofline is the silicon and which the efficiency
factors. It prints, per step:

- measured and predicted time (the planner's default efficiencies, or those given), and the
  planner's error;
- the achieved share of peak HBM bandwidth (MBU) and of peak FP16 tensor FLOP/s (MFU), the
  numbers ``--bandwidth-efficiency`` / ``--compute-efficiency`` stand for;
- tokens/s relative to batch 1 at the same context, measured and predicted: the planner's
  batch-size curve (``python -m server.planner batch-curve``) on real silicon.

Needs PyTorch with CUDA (not a dependency of Backfill); ``--device cpu --tiny`` runs a small
decoder on the CPU to try the script.

    python -m benchmarks.bench_roofline_gpu --model Llama-3-8B --accelerator H200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_builder.step_cost import StepShape
from server.planner.presets import ACCELERATORS, MODELS, ModelShape, weight_format
from server.planner.roofline import Deployment, Efficiency

TINY = ModelShape("tiny", 2, 256, 512, 4, 2, 1000, 4096, head_dim=64)


@dataclass(frozen=True, slots=True)
class Row:
    kind: str  # "decode" | "prefill"
    batch: int  # sequences in the step
    context: int  # tokens each decode attends to; a prefill's prompt length
    measured_ms: float
    predicted_ms: float
    mbu: float  # achieved bytes/s over peak HBM bandwidth
    mfu: float  # achieved FLOP/s over peak FP16 tensor FLOP/s

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1.0


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise SystemExit("bench_roofline_gpu needs PyTorch (with CUDA for a GPU)") from None
    return torch


class Decoder:
    """A Llama-shaped decoder with random weights: just the kernels a step runs."""

    def __init__(self, shape: ModelShape, device: str) -> None:
        torch = self.torch = _torch()
        self.shape, self.device = shape, device
        self.dtype = torch.float16 if device != "cpu" else torch.float32
        gen = torch.Generator(device=device).manual_seed(0)
        heads, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        hidden = shape.hidden_size

        def weight(rows: int, cols: int) -> Any:
            w = torch.empty(rows, cols, device=device, dtype=self.dtype)
            return w.normal_(0.0, rows ** -0.5, generator=gen)

        self.layers = [
            {"qkv": weight(hidden, (heads + 2 * kv) * d), "o": weight(heads * d, hidden),
             "gate_up": weight(hidden, 2 * shape.intermediate_size),
             "down": weight(shape.intermediate_size, hidden),
             "norm1": torch.ones(hidden, device=device, dtype=self.dtype),
             "norm2": torch.ones(hidden, device=device, dtype=self.dtype)}
            for _ in range(shape.num_layers)
        ]
        self.embed = weight(shape.vocab_size, hidden)
        self.head = weight(hidden, shape.vocab_size)
        self.norm = torch.ones(hidden, device=device, dtype=self.dtype)

    def _rms(self, x: Any, w: Any) -> Any:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * self.torch.rsqrt(var + 1e-5)).to(x.dtype) * w

    def _rope(self, x: Any, cos: Any, sin: Any) -> Any:
        half = x.shape[-1] // 2
        rotated = self.torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _layer_rest(self, x: Any, attn: Any, layer: dict[str, Any]) -> Any:
        f = self.torch.nn.functional
        x = x + attn @ layer["o"]
        gate, up = (self._rms(x, layer["norm2"]) @ layer["gate_up"]).chunk(2, dim=-1)
        return x + (f.silu(gate) * up) @ layer["down"]

    def _split(self, h: Any, rows: int, length: int) -> tuple[Any, Any, Any]:
        s = self.shape
        q, k, v = h.split([s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
                           s.num_kv_heads * s.head_dim], dim=-1)
        return (q.reshape(rows, length, s.num_heads, s.head_dim).transpose(1, 2),
                k.reshape(rows, length, s.num_kv_heads, s.head_dim).transpose(1, 2),
                v.reshape(rows, length, s.num_kv_heads, s.head_dim).transpose(1, 2))

    def decode_step(self, batch: int, context: int) -> Callable[[], Any]:
        """One step of ``batch`` sequences each decoding its token ``context`` (its own
        included), as a closure over its static tensors."""
        torch, s = self.torch, self.shape
        f = torch.nn.functional
        cache = (batch, s.num_kv_heads, context, s.head_dim)
        caches = [(torch.zeros(cache, device=self.device, dtype=self.dtype),
                   torch.zeros(cache, device=self.device, dtype=self.dtype))
                  for _ in range(s.num_layers)]
        ids = torch.randint(0, s.vocab_size, (batch,), device=self.device)
        cos = torch.ones(s.head_dim, device=self.device, dtype=self.dtype)
        sin = torch.zeros(s.head_dim, device=self.device, dtype=self.dtype)
        pos = context - 1

        def step() -> Any:
            x = self.embed[ids]
            for layer, (k_cache, v_cache) in zip(self.layers, caches, strict=True):
                q, k, v = self._split(self._rms(x, layer["norm1"]) @ layer["qkv"], batch, 1)
                k_cache[:, :, pos:pos + 1] = self._rope(k, cos, sin)
                v_cache[:, :, pos:pos + 1] = v
                attn = f.scaled_dot_product_attention(self._rope(q, cos, sin), k_cache,
                                                      v_cache, enable_gqa=True)
                x = self._layer_rest(x, attn.reshape(batch, -1), layer)
            return (self._rms(x, self.norm) @ self.head).argmax(-1)

        return step

    def prefill_step(self, length: int) -> Callable[[], Any]:
        """One sequence's prompt of ``length`` tokens in one step; its last row samples."""
        torch = self.torch
        f = torch.nn.functional
        ids = torch.randint(0, self.shape.vocab_size, (length,), device=self.device)

        def step() -> Any:
            x = self.embed[ids]
            for layer in self.layers:
                q, k, v = self._split(self._rms(x, layer["norm1"]) @ layer["qkv"], 1, length)
                attn = f.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                x = self._layer_rest(x, attn.transpose(1, 2).reshape(length, -1), layer)
            return (self._rms(x[-1:], self.norm) @ self.head).argmax(-1)

        return step


def time_step(torch: Any, step: Callable[[], Any], device: str, iters: int) -> float:
    """Median seconds of one replay of ``step`` (captured in a CUDA graph on a GPU)."""
    if device == "cpu":
        step()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs ask
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times)


def run(args: argparse.Namespace) -> tuple[Deployment, list[Row]]:
    shape = TINY if args.tiny else MODELS[args.model]
    deployment = Deployment(
        ACCELERATORS[args.accelerator], shape, weight_format("fp16"),
        efficiency=Efficiency(args.bandwidth_efficiency, args.compute_efficiency,
                              args.step_overhead_ms),
    )
    cost = deployment.step_cost()
    accel = deployment.accelerator
    decoder = Decoder(shape, args.device)
    torch = decoder.torch
    rows: list[Row] = []

    def measure(kind: str, batch: int, context: int, step: Callable[[], Any],
                shape_: StepShape) -> None:
        seconds = time_step(torch, step, args.device, args.iters)
        moved, flops = cost.traffic(shape_)
        rows.append(Row(kind, batch, context, seconds * 1e3, cost.predict(shape_) * 1e3,
                        moved / seconds / (accel.bandwidth_gb_s * 1e9),
                        flops / seconds / (accel.fp16_tflops * 1e12)))
        print(_format(rows[-1]), flush=True)

    print(f"{deployment.label}; PyTorch {torch.__version__} on {_device_name(torch, args)}")
    print(_HEADER)
    for context in _ints(args.contexts):
        for batch in _ints(args.batches):
            if batch * context * shape.kv_elements_per_token() * 2 > args.max_kv_gb * 1e9:
                continue  # this batch's KV cache would not fit the memory given to it
            shape_ = StepShape()
            shape_.add_decodes(context, batch)
            measure("decode", batch, context, decoder.decode_step(batch, context), shape_)
            if args.device != "cpu":
                torch.cuda.empty_cache()
    for length in _ints(args.prefills):
        shape_ = StepShape()
        shape_.add_prefill(0, length, True)
        measure("prefill", 1, length, decoder.prefill_step(length), shape_)
    return deployment, rows


_HEADER = (f"{'step':>8} {'batch':>5} {'context':>7} {'measured ms':>11} {'roofline ms':>11} "
           f"{'error':>7} {'MBU':>5} {'MFU':>5}")


def _format(r: Row) -> str:
    return (f"{r.kind:>8} {r.batch:>5} {r.context:>7} {r.measured_ms:>11.3f} "
            f"{r.predicted_ms:>11.3f} {r.error:>+7.0%} {r.mbu:>5.0%} {r.mfu:>5.0%}")


def batch_curve(rows: list[Row]) -> list[dict[str, float]]:
    """tokens/s relative to batch 1 at each context: measured and predicted."""
    out = []
    for r in rows:
        one = next((b for b in rows if b.kind == "decode" and b.batch == 1
                    and b.context == r.context), None)
        if r.kind != "decode" or one is None:
            continue
        out.append({"context": r.context, "batch": r.batch,
                    "measured": r.batch * one.measured_ms / r.measured_ms,
                    "predicted": r.batch * one.predicted_ms / r.predicted_ms})
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _device_name(torch: Any, args: argparse.Namespace) -> str:
    return torch.cuda.get_device_name() if args.device != "cpu" else "CPU"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3-8B", choices=sorted(MODELS))
    p.add_argument("--accelerator", default="H200", choices=sorted(ACCELERATORS),
                   help="the preset the prediction uses (name the GPU the run is on)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a two-layer decoder, to try the script")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--contexts", default="512,2048", help="tokens each decode attends to")
    p.add_argument("--prefills", default="128,512,2048,8192", help="prompt lengths")
    p.add_argument("--max-kv-gb", type=float, default=80.0,
                   help="skip a decode whose KV cache would take more than this")
    p.add_argument("--iters", type=int, default=20, help="timed replays per step")
    defaults = Efficiency()
    p.add_argument("--bandwidth-efficiency", type=float, default=defaults.bandwidth)
    p.add_argument("--compute-efficiency", type=float, default=defaults.compute)
    p.add_argument("--step-overhead-ms", type=float, default=defaults.step_overhead_ms)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    deployment, rows = run(args)

    print("\ntokens/s relative to batch 1 (the batch-size curve), measured vs roofline:")
    curve = batch_curve(rows)
    for c in curve:
        print(f"  context {c['context']:>5} batch {c['batch']:>4}: measured "
              f"{c['measured']:6.2f}x, roofline {c['predicted']:6.2f}x")
    memory_bound = [r.mbu for r in rows if r.kind == "decode" and r.mbu > r.mfu]
    compute_bound = [r.mfu for r in rows if r.kind == "prefill" and r.mfu > r.mbu]
    if memory_bound:
        print(f"median MBU of memory-bound decodes: {statistics.median(memory_bound):.0%} "
              f"(the planner's --bandwidth-efficiency is {args.bandwidth_efficiency:.0%})")
    if compute_bound:
        print(f"best MFU of compute-bound prefills: {max(compute_bound):.0%} "
              f"(the planner's --compute-efficiency is {args.compute_efficiency:.0%})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "deployment": deployment.label, "efficiency": dataclasses.asdict(
                deployment.efficiency),
            "rows": [dataclasses.asdict(r) | {"error": r.error} for r in rows],
            "batch_curve": curve}, indent=2))


if __name__ == "__main__":
    main()
