"""One live sequence's output on the TensorRT-LLM path: detokenization and stop strings.

The engine streams token ids; this turns them into ``TokenDelta`` text that never splits a
UTF-8 character (``IncrementalDetokenizer``) and ends before the first stop string. Text that
could be the start of a stop string is held back until the next tokens decide it; a final
delta releases whatever is held (it was not a stop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from server.executor.base import ExecRequest, FinishReason, TokenDelta


class Detokenizer(Protocol):
    def push(self, ids: Sequence[int]) -> str: ...

    def flush(self) -> str: ...


class StopMatcher:
    """Finds the earliest stop string in a text stream, holding back possible stop prefixes.

    Invariant: no stop string occurs in text already released, nor across the release point,
    because any suffix that is a proper prefix of a stop string is held.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""
        self._matched = ""  # the text from a match on, in case the caller overrules it

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string was found: then nothing more counts)."""
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            self._matched = buffer[min(hits):]
            return buffer[:min(hits)], True
        keep = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def release_match(self) -> str:
        """The text from the last match on, when the caller decides it was not a stop."""
        matched, self._matched = self._matched, ""
        return matched

    def release(self) -> str:
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best


@dataclass(frozen=True, slots=True)
class Emitted:
    """What one batch of engine tokens became."""

    delta: TokenDelta | None  # None when there is nothing to say yet
    stopped: bool  # a stop string matched: finish now and cancel the engine request


class SequenceStream:
    """Per request: counts, text, stop strings, and the first/last-delta extras."""

    def __init__(self, request: ExecRequest, detokenizer: Detokenizer) -> None:
        self.request = request
        self.generated: list[int] = []  # this run's tokens (resume tokens not included)
        self.finished = False
        self.prompt_counted = False  # the adapter counts prompt/cached tokens once
        self._detok = detokenizer
        self._stops = StopMatcher(request.sampling.stop)
        self._sent_first = False
        self._cached: int | None = None

    @property
    def num_done(self) -> int:
        """Tokens counted against max/min tokens: resumed plus generated in this run."""
        return len(self.request.resume_token_ids) + len(self.generated)

    def note_cached(self, cached_tokens: int | None) -> None:
        if cached_tokens is not None and self._cached is None:
            self._cached = min(cached_tokens, len(self.request.prompt_token_ids)
                               + len(self.request.resume_token_ids))

    def on_tokens(self, ids: Sequence[int], *, proposed: int = 0, accepted: int = 0) -> Emitted:
        """New engine tokens (not final)."""
        text, stopped = self._advance(ids)
        if stopped:
            return Emitted(self._delta(ids, text, FinishReason.STOP, None, proposed, accepted),
                           True)
        if not ids and not text and not proposed:
            return Emitted(None, False)
        return Emitted(self._delta(ids, text, None, None, proposed, accepted), False)

    def on_final(self, ids: Sequence[int], finish: FinishReason, error: str | None = None, *,
                 proposed: int = 0, accepted: int = 0) -> TokenDelta:
        """The last tokens and the finish; releases held text (it did not become a stop)."""
        text, stopped = self._advance(ids)
        if not stopped:
            tail, stopped = self._stops.feed(self._detok.flush())
            text += tail if stopped else tail + self._stops.release()
        if stopped:
            finish, error = FinishReason.STOP, None
        return self._delta(ids, text, finish, error, proposed, accepted)

    def _advance(self, ids: Sequence[int]) -> tuple[str, bool]:
        """Text released by ids, and whether a stop string matched (only after min_tokens)."""
        self.generated.extend(ids)
        text, stopped = self._stops.feed(self._detok.push(ids))
        if stopped and self.num_done < self.request.sampling.min_tokens:
            # Too early to stop: the matched text is ordinary output.
            return text + self._stops.release_match(), False
        return text, stopped

    def cancelled(self) -> TokenDelta:
        return self.on_final((), FinishReason.CANCELLED)

    def failed(self, message: str) -> TokenDelta:
        self.finished = True
        return self._delta((), "", FinishReason.ERROR, message, 0, 0)

    def _delta(self, ids: Sequence[int], text: str, finish: FinishReason | None,
               error: str | None, proposed: int, accepted: int) -> TokenDelta:
        first = not self._sent_first
        self._sent_first = True
        if finish is not None:
            self.finished = True
        cached = self._cached if self._cached is not None else 0
        return TokenDelta(
            request_id=self.request.request_id,
            token_ids=tuple(ids),
            text=text,
            finish=finish,
            error=error,
            cached_prompt_tokens=cached if first or finish is not None else None,
            draft_tokens_proposed=proposed,
            draft_tokens_accepted=accepted,
        )
