"""Scheduler events as OpenAI JSON: logprobs in the chat and the completions (legacy) shapes,
token texts, finish reasons and usage."""

from __future__ import annotations

from typing import Any

from backfill.openai_output import UsageCounts
from engine_builder.tokenizer import EngineTokenizer
from server.executor.base import TokenLogprob
from server.scheduler.types import Outcome, Usage

FINISH = {Outcome.STOP: "stop", Outcome.LENGTH: "length"}


class TokenTexts:
    """Token id -> its text and bytes, for logprobs (built on first use, once per model)."""

    def __init__(self, tokenizer: EngineTokenizer) -> None:
        self._tokenizer = tokenizer
        self._bytes: list[bytes] | None = None

    def bytes_of(self, token_id: int) -> bytes:
        if self._bytes is None:
            table = self._tokenizer.token_bytes
            self._bytes = table if table is not None else [
                self._tokenizer.decode([i]).encode("utf-8")
                for i in range(self._tokenizer.vocab_size)
            ]
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def text(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")


def chat_logprobs(texts: TokenTexts, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [
        {**_chat_entry(texts, lp.token_id, lp.logprob),
         "top_logprobs": [_chat_entry(texts, t, v) for t, v in lp.top]}
        for lp in logprobs
    ]}


def _chat_entry(texts: TokenTexts, token_id: int, logprob: float) -> dict[str, Any]:
    raw = texts.bytes_of(token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
            "bytes": list(raw)}


def completion_logprobs(
    texts: TokenTexts, logprobs: list[TokenLogprob], first_token: int | None = None
) -> dict[str, Any]:
    """The legacy shape. ``first_token``: under echo, the prompt's first token, which has no
    logprob (nothing comes before it)."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = 0
    if first_token is not None:
        tokens.append(texts.text(first_token))
        values.append(None)
        tops.append(None)
        offsets.append(0)
        offset = len(tokens[0])
    for lp in logprobs:
        text = texts.text(lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({texts.text(t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def usage_counts(u: Usage) -> UsageCounts:
    return UsageCounts(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens,
                       u.draft_tokens_proposed, u.draft_tokens_accepted)
