"""``python -m client``: generate, run offline batch jobs, inspect the server, load-test it.

    python -m client generate "What is the capital of France?"     # chat template applied
    python -m client generate --raw --target 127.0.0.1:50051 "Once upon a time" --max-tokens 32
    python -m client batch submit prompts.jsonl --wait      # formats: backfill.batch_format
    python -m client batch status JOB_ID
    python -m client batch results JOB_ID --output results.jsonl   # resumable; errors apart
    python -m client batch cancel JOB_ID | batch list
    python -m client models | stats
    python -m client bench --time-scale 10 --duration 30 --offline-backlog 200   # [--trace CSV]

``--target`` defaults to ``$BACKFILL_TARGET``, else ``127.0.0.1:50051``; ``--api-key`` to
``$BACKFILL_API_KEY``; ``--tls``, ``--tls-ca``, ``--tls-cert`` / ``--tls-key`` (mTLS) secure
the channel. Exit status: 0 ok, 1 the server answered an error, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from backfill.progress import progress
from backfill.transport import DEFAULT_MAX_MESSAGE_MB
from client.aio import AsyncClient
from client.batch_io import ResultFiles, errors_path_for, parse_window, upload_progress
from client.bench.command import add_bench_arguments, run_bench
from client.credentials import cli_credentials
from client.errors import BackfillError
from client.jobs import result_line
from client.types import BatchJob, Chunk, JobState, SamplingParams, Tier

DEFAULT_TARGET = "127.0.0.1:50051"


def _client(args: argparse.Namespace) -> AsyncClient:
    credentials = cli_credentials(args.tls, args.tls_ca, args.tls_cert, args.tls_key)
    return AsyncClient(args.target, credentials=credentials, timeout=args.timeout,
                       max_message_mb=args.max_message_mb, tenant=getattr(args, "tenant", ""),
                       api_key=args.api_key or None)


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop or ()),
    )


async def _generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    async with _client(args) as client:
        messages = None
        if await _as_chat(client, args):
            messages = [{"role": "user", "content": prompt}]
            if args.system:
                messages.insert(0, {"role": "system", "content": args.system})
        stream = client.generate(
            None if messages else prompt,
            messages=messages,
            sampling=_sampling(args),
            tier=args.tier,
            deadline=args.deadline,
            model=args.model,
        )
        last, wrote = None, False
        async for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            wrote = wrote or bool(chunk.text)
            last = chunk
        sys.stdout.write("\n")
    if last is not None and not wrote:
        print(f"(no text: {_ending(last)})", file=sys.stderr)
    elif args.usage and last is not None:
        print(f"[{_ending(last)}]", file=sys.stderr)
    return 0


async def _as_chat(client: AsyncClient, args: argparse.Namespace) -> bool:
    """Chat messages unless --raw: always with --chat or --system, else when the model has a
    chat template (an instruct model given bare text tends to stop at once)."""
    if args.raw:
        return False
    if args.chat or args.system:
        return True
    models = await client.list_models()
    model = next((m for m in models if m.name == args.model), models[0] if models else None)
    return model is not None and model.has_chat_template


def _ending(last: Chunk) -> str:
    """``finish reason stop; prompt 12 (cached 0), completion 0 tokens, TTFT 31 ms``."""
    reason = last.finish_reason.value if last.finish_reason else "unknown"
    text = f"finish reason {reason}"
    if last.usage is not None:
        u = last.usage
        plural = "" if u.completion_tokens == 1 else "s"
        text += (f"; prompt {u.prompt_tokens} (cached {u.cached_prompt_tokens}), completion "
                 f"{u.completion_tokens} token{plural}")
    if last.timing is not None and last.timing.ttft_s is not None:
        text += f", TTFT {last.timing.ttft_s * 1e3:.0f} ms"
    return text


def _print_job(job: BatchJob) -> None:
    line: dict[str, object] = {
        "id": job.id,
        "state": job.state.value,
        "total": job.total,
        "completed": job.completed,
        "failed": job.failed,
        "cancelled": job.cancelled,
        "expired": job.expired,
        "completion_tokens": job.completion_tokens,
    }
    if job.error:
        line["error"] = job.error
    print(json.dumps(line))


def job_postfix(job: BatchJob) -> str:
    """What a batch job's progress bar shows beside the count.

    >>> from client.types import JobState
    >>> job_postfix(BatchJob("j", JobState.RUNNING, total=4, completed=2, failed=1))
    '1 failed, 0 tokens, running'
    """
    parts = [f"{job.failed} failed"] if job.failed else []
    parts += [f"{job.cancelled} cancelled"] if job.cancelled else []
    return ", ".join([*parts, f"{job.completion_tokens} tokens", job.state.value])


async def _follow(client: AsyncClient, job_id: str, interval_s: float) -> BatchJob:
    """Follows the job to its end (a progress bar on a terminal); returns its last state."""
    last: BatchJob | None = None
    with progress(total=None, desc=f"job {job_id}", unit="request") as bar:
        async for job in client.watch(job_id, interval_s=interval_s):
            bar.total = job.total
            bar.update(job.finished - bar.n)
            bar.set_postfix_str(job_postfix(job))
            last = job
    assert last is not None
    return last


async def _batch(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        if args.batch_command == "submit":
            job = await _submit(client, args)
            print(job.id, flush=True)
            if job.failed:
                sys.stderr.write(f"{job.failed} of {job.total} requests failed validation "
                                 f"(their errors: batch results {job.id})\n")
            if job.state is JobState.FAILED:
                sys.stderr.write(f"error: the job failed: {job.error}\n")
                return 1
            if args.wait:
                _print_job(await _follow(client, job.id, args.interval))
        elif args.batch_command == "status":
            if args.wait:
                _print_job(await _follow(client, args.job_id, args.interval))
            else:
                _print_job(await client.get_batch(args.job_id))
        elif args.batch_command == "results":
            await _results(client, args)
        elif args.batch_command == "cancel":
            _print_job(await client.cancel_batch(args.job_id))
        else:
            for job in await client.list_batches(limit=args.limit):
                _print_job(job)
    return 0


async def _submit(client: AsyncClient, args: argparse.Namespace) -> BatchJob:
    on_progress, close = upload_progress(os.path.getsize(args.file))
    try:
        return await client.submit_batch(
            args.file, idempotency_key=args.idempotency_key, model=args.model,
            completion_window=parse_window(args.completion_window)
            if args.completion_window else None,
            on_progress=on_progress,
        )
    finally:
        close()


async def _results(client: AsyncClient, args: argparse.Namespace) -> None:
    """To stdout (every result), or to --output and its error file, resuming what they hold."""
    job = await client.get_batch(args.job_id)
    files = None
    if args.output:
        output = Path(args.output)
        files = ResultFiles(job.id, output, Path(args.errors) if args.errors
                            else errors_path_for(output))
    start = files.start_index if files else 0
    bar = progress(total=job.total, desc=f"job {job.id} results", unit="result")
    bar.update(start)
    try:
        async for result in client.results(args.job_id, start_index=start):
            if files is None:
                print(json.dumps(result_line(job.id, result), ensure_ascii=False), flush=True)
            else:
                files.write(result)
            bar.update()
    finally:
        bar.close()
        if files is not None:
            files.close()


async def _models(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        for m in await client.list_models():
            print(
                f"{m.name}\tbackend={m.backend} arch={m.architecture} quant={m.weight_quant} "
                f"kv={m.kv_cache_dtype} slots={m.max_batch_size} max_seq_len={m.max_seq_len} "
                f"vocab={m.vocab_size} params={m.parameter_count} "
                f"chat_template={'yes' if m.has_chat_template else 'no'}"
            )
    return 0


async def _stats(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        s = await client.stats()
    print(f"slots {s.slots_busy}/{s.slots_total} busy, occupancy {s.slot_occupancy:.0%}")
    for tier in Tier:
        t = s.tier(tier)
        print(
            f"{tier.value:<8} running {t.running}, queued {t.queued}, finished "
            f"{t.requests_finished}, {t.generated_tokens} tokens, {t.tokens_per_second:.1f} tok/s"
        )
    print(
        f"{s.tokens_per_second:.1f} tok/s, utilization {s.utilization:.0%}, "
        f"cost/1M tokens {s.cost_per_million_tokens:.2f}, KV {s.kv_blocks_used}/"
        f"{s.kv_blocks_total} blocks, prefix hit {s.prefix_cache_hit_ratio:.0%}"
    )
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=os.environ.get("BACKFILL_TARGET", DEFAULT_TARGET))
    parser.add_argument("--tls", action="store_true",
                        help="TLS (with the system's root CAs unless --tls-ca)")
    parser.add_argument("--tls-ca", default=None,
                        help="PEM CA certificates to trust (implies --tls)")
    parser.add_argument("--tls-cert", default=None,
                        help="PEM client certificate, for a server that requires one (mTLS)")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--api-key", default=os.environ.get("BACKFILL_API_KEY", ""),
                        help="API key of a server with --auth-keys (default: $BACKFILL_API_KEY)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per call")
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_MB,
                        help="largest gRPC message sent or received, in MiB; keep it equal to "
                             "the server's --max-message-mb (default: %(default)s)")


def _add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("generate", help="stream one completion to the terminal")
    _common(p)
    p.add_argument("prompt", help="prompt text ('-' reads stdin)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--raw", action="store_true",
                      help="send the text as is (default: as a user chat message when the "
                           "model has a chat template)")
    form.add_argument("--chat", action="store_true",
                      help="send as a user chat message even if the server does not say the "
                           "model has a chat template")
    p.add_argument("--system", default=None, help="system message (implies chat)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--tier", choices=[t.value for t in Tier], default="online")
    p.add_argument("--deadline", type=float, default=None, help="TTFT deadline, seconds")
    p.add_argument("--model", default="")
    p.add_argument("--usage", action="store_true", help="print usage and timing to stderr")
    p.set_defaults(run=_generate)


def _add_batch(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("batch", help="offline batch jobs")
    bsub = p.add_subparsers(dest="batch_command", required=True)
    submit = bsub.add_parser(
        "submit", help="submit a JSONL file, Backfill's or OpenAI's Batch format (a bad line "
        "fails that line only)")
    submit.add_argument("file")
    submit.add_argument("--idempotency-key", default=None,
                        help="resubmitting with the same key returns the first job (default: a "
                             "fresh key, so only this command's own retries are deduplicated)")
    submit.add_argument("--completion-window", default=None,
                        help="time the job has to finish, e.g. 24h (default: the server's, 24h)")
    submit.add_argument("--model", default="", help="run every request on this model")
    submit.add_argument("--wait", action="store_true",
                        help="follow the job to its end (a progress bar on a terminal), then "
                             "print its final state")
    status = bsub.add_parser("status", help="a job's progress")
    status.add_argument("job_id")
    status.add_argument("--wait", action="store_true",
                        help="follow the job to its end (a progress bar on a terminal)")
    results = bsub.add_parser("results", help="results as JSONL, following the job to its end")
    results.add_argument("job_id")
    results.add_argument("--output", default=None,
                         help="write successful results here and resume what it holds "
                              "(default: everything to stdout)")
    results.add_argument("--errors", default=None,
                         help="with --output: where failed results go (default: OUTPUT's name "
                              "with .errors before its suffix)")
    cancel = bsub.add_parser("cancel", help="cancel a job's unfinished requests")
    cancel.add_argument("job_id")
    listing = bsub.add_parser("list", help="the tenant's jobs, newest first")
    listing.add_argument("--limit", type=int, default=0, help="at most this many (0 = all)")
    for q in (submit, status, results, cancel, listing):
        _common(q)
        q.add_argument("--tenant", default=os.environ.get("BACKFILL_TENANT", ""),
                       help="owner of the jobs (default: $BACKFILL_TENANT, else none)")
        q.add_argument("--interval", type=float, default=0.5, help="progress poll period (s)")
    p.set_defaults(run=_batch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_batch(sub)
    for name, fn, text in (("models", _models, "list models"), ("stats", _stats, "GetStats")):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.set_defaults(run=fn)
    bench = sub.add_parser("bench", help="load generator: trace replay, Poisson, sweeps")
    _common(bench)
    add_bench_arguments(bench)
    bench.set_defaults(run=run_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.run
    try:
        return asyncio.run(run(args))
    except BackfillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
