"""When a sequence stops, and what text it emits: stop ids, EOS, stop strings, min/max tokens.

Text is held back while it could still be the start of a stop string, so the output never shows
part of a stop string that later completes; the output ends right before the first occurrence.
Resumed tokens (ExecRequest.resume_token_ids) count as generated, and the detokenizer is seeded
with them, so a resumed request continues the same text stream.
"""

from __future__ import annotations

from engine_builder.tokenizer import EngineTokenizer, IncrementalDetokenizer
from server.executor.base import FinishReason, SamplingParams


class OutputTracker:
    """Per-sequence stop logic and streaming text. Invariant: `held` never contains a whole
    stop string (the sequence would have stopped), only a possible beginning of one."""

    def __init__(
        self,
        params: SamplingParams,
        tokenizer: EngineTokenizer,
        context_ids: list[int],
        num_resumed: int,
    ) -> None:
        self.params = params
        self.num_generated = num_resumed
        self._detok = IncrementalDetokenizer(tokenizer, prefix_ids=context_ids)
        eos = () if params.ignore_eos else tokenizer.eos_token_ids
        self._stop_ids = frozenset(params.stop_token_ids) | frozenset(eos)
        self._held = ""

    @property
    def reached_max_tokens(self) -> bool:
        return self.num_generated >= self.params.max_tokens

    def banned_ids(self, ahead: int = 0) -> frozenset[int]:
        """Ids the next token may not be: EOS and stop ids before min_tokens are reached.
        ``ahead``: for the token that many after the next (a drafter looking ahead)."""
        if self.num_generated + ahead < self.params.min_tokens:
            return self._stop_ids
        return frozenset()

    def push(self, token_id: int) -> tuple[str, FinishReason | None]:
        """Accounts one generated token; returns (text to emit now, finish or None)."""
        stops_active = self.num_generated >= self.params.min_tokens
        self.num_generated += 1
        if stops_active and token_id in self._stop_ids:
            return self.flush_held(), FinishReason.STOP
        self._held += self._detok.push([token_id])
        if stops_active and self.params.stop:
            cut = _first_occurrence(self._held, self.params.stop)
            if cut is not None:
                text, self._held = self._held[:cut], ""
                return text, FinishReason.STOP
        if self.reached_max_tokens:
            return self.flush(), FinishReason.LENGTH
        return self._release(), None

    def flush(self) -> str:
        """Everything held back, incomplete UTF-8 included (as U+FFFD): the sequence ended."""
        return self.flush_held() + self._detok.flush()

    def flush_held(self) -> str:
        """Text held back for stop strings only; bytes of an unfinished character stay in the
        detokenizer (a resumed run's detokenizer completes them)."""
        text, self._held = self._held, ""
        return text

    def _release(self) -> str:
        """Emits all of `held` except its longest suffix that could begin a stop string."""
        keep = _longest_stop_prefix_suffix(self._held, self.params.stop)
        cut = len(self._held) - keep
        text, self._held = self._held[:cut], self._held[cut:]
        return text


def _first_occurrence(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
