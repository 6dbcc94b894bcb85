"""``python -m engine_builder run DIR --prompt TEXT``: one generation through the executor.

The engine opens with ``server.executor.factory.load_executor`` (the same path the server
takes), the prompt is tokenized with the engine's tokenizer (``--chat`` renders it as one user
message), and the executor's text deltas stream to stdout as they come.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine_builder.manifest import Manifest, ManifestError
from engine_builder.tokenizer import EngineTokenizer
from engine_builder.usage import UsageError

POLL_TIMEOUT_S = 0.1


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="generate from one prompt with an engine")
    p.add_argument("engine_dir", type=Path, metavar="DIR")
    p.add_argument("--prompt", required=True, help="prompt text (special tokens allowed)")
    p.add_argument("--chat", action="store_true", help="apply the chat template to the prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true",
                   help='print {"token_ids", "text", "finish_reason"} at the end instead')
    p.set_defaults(handler=run)


def prompt_ids(tokenizer: EngineTokenizer, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return tokenizer.encode(prompt)
    if not tokenizer.has_chat_template:
        raise UsageError("--chat", "this engine has no chat template")
    return tokenizer.encode_chat([{"role": "user", "content": prompt}])


def generate(executor: Any, request: Any, on_text: Callable[[str], None]) -> dict[str, Any]:
    """Drives one request to its finish; returns token ids, text and the finish reason."""
    from server.executor.base import FinishReason

    executor.enqueue(request)
    token_ids: list[int] = []
    texts: list[str] = []
    while True:
        for delta in executor.poll(POLL_TIMEOUT_S):
            if delta.request_id != request.request_id:
                continue
            token_ids.extend(delta.token_ids)
            texts.append(delta.text)
            on_text(delta.text)
            if delta.finish is FinishReason.ERROR:
                raise RuntimeError(f"the engine failed the request: {delta.error}")
            if delta.finish is not None:
                return {"token_ids": token_ids, "text": "".join(texts),
                        "finish_reason": delta.finish.value}


def run(args: argparse.Namespace) -> int:
    from server.executor.base import ExecRequest, SamplingParams
    from server.executor.factory import load_executor

    try:
        manifest = Manifest.load(args.engine_dir)
        sampling = SamplingParams(temperature=args.temperature, seed=args.seed,
                                  max_tokens=args.max_tokens)
    except ManifestError as exc:
        raise UsageError("DIR", str(exc)) from exc
    except ValueError as exc:
        raise UsageError("--max-tokens/--temperature/--seed", str(exc)) from exc
    tokenizer = EngineTokenizer.load(args.engine_dir, manifest)
    ids = prompt_ids(tokenizer, args.prompt, args.chat)
    executor = load_executor(args.engine_dir)
    try:
        request = ExecRequest(request_id=1, prompt_token_ids=tuple(ids), sampling=sampling)

        def stream(text: str) -> None:
            if not args.json:
                sys.stdout.write(text)
                sys.stdout.flush()

        try:
            result = generate(executor, request, stream)
        except ValueError as exc:  # enqueue refused it (e.g. prompt longer than max_seq_len)
            raise UsageError("--prompt", str(exc)) from exc
    finally:
        executor.shutdown()
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0
