"""Per-sequence state of the CPU engine, and the chunk of it that one step computes."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.executor.base import ExecRequest, FinishReason, TokenDelta, TokenLogprob
from server.executor.cpu.stops import OutputTracker


@dataclass(slots=True, eq=False)  # identity semantics: `in` and `remove` on lists
class Sequence:
    """One request's live state. ``token_ids`` = prompt + resumed + generated.

    Invariant while running: ``num_computed < len(token_ids)``; the tokens in between are what
    its next step computes (a prefill chunk, or the one token sampled last step).
    """

    request: ExecRequest
    seed: int
    tracker: OutputTracker
    token_ids: list[int]
    num_computed: int = 0  # tokens whose K/V is in the cache
    cached_prompt_tokens: int | None = None  # set at first admission
    # Output since the last delta was taken.
    out_ids: list[int] = field(default_factory=list)
    out_text: str = ""
    report_cached: bool = False
    # In the context phase: admitted and not sampled from since. Not the same as
    # num_pending > 1: a one-token prompt, or a prompt the prefix cache covers but for its
    # last token, is in its context phase with a single pending token.
    prefilling: bool = True
    finish: FinishReason | None = None
    error: str | None = None
    # Logprobs of out_ids, when the request asked for them (None otherwise).
    out_logprobs: list[TokenLogprob] | None = None
    # Prompt tokens scored so far (position 1 on), when asked for and not resumed; they go out
    # once, with the first generated token.
    prompt_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs_sent: bool = False
    # Speculative decoding since the last delta: drafted tokens verified, accepted, and the
    # steps that verified them; ``drafter`` names who proposed them.
    draft_proposed: int = 0
    draft_accepted: int = 0
    speculative_steps: int = 0
    drafter: str | None = None

    def __post_init__(self) -> None:
        sampling = self.request.sampling
        if sampling.logprobs is not None:
            self.out_logprobs = []
        if sampling.prompt_logprobs is not None and not self.request.resume_token_ids:
            self.prompt_logprobs = []

    @property
    def request_id(self) -> int:
        return self.request.request_id

    @property
    def priority(self) -> float:
        return self.request.priority

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def scores_prompt(self) -> bool:
        """Prompt positions are still to be scored: computed whole, not from the prefix cache."""
        scored = self.prompt_logprobs
        return scored is not None and len(scored) < self.prompt_len - 1

    @property
    def generated_ids(self) -> list[int]:
        """Tokens generated so far, resumed ones included."""
        return self.token_ids[self.prompt_len :]

    def append_sample(
        self, token: int, max_seq_len: int, logprob: TokenLogprob | None = None
    ) -> FinishReason | None:
        """Accounts one sampled token (output, stop rules, text); returns why the sequence
        ends now, if it does."""
        self.token_ids.append(token)
        self.prefilling = False
        self.out_ids.append(token)
        if self.out_logprobs is not None and logprob is not None:
            self.out_logprobs.append(logprob)
        text, finish = self.tracker.push(token)
        self.out_text += text
        if finish is None and len(self.token_ids) >= max_seq_len:
            self.out_text += self.tracker.flush()
            finish = FinishReason.LENGTH
        return finish

    def end(self, reason: FinishReason, error: str | None = None) -> None:
        """Marks the sequence finished; its last delta reports the cached prompt tokens."""
        self.finish, self.error = reason, error
        self.report_cached = True

    def end_early(self, reason: FinishReason, error: str | None = None) -> None:
        """Stopped from outside (cancel, error): what stop rules held back is emitted."""
        self.out_text += self.tracker.flush_held()
        self.end(reason, error)

    def count_verified(self, drafter: str, proposed: int, accepted: int) -> None:
        """One step verified ``proposed`` drafted tokens of this sequence."""
        self.draft_proposed += proposed
        self.draft_accepted += accepted
        self.speculative_steps += 1
        self.drafter = drafter

    @property
    def has_output(self) -> bool:
        """Anything for the next delta: tokens, or speculation counts of a step that
        yielded none (it ended the sequence)."""
        return bool(self.out_ids or self.speculative_steps)

    def take_delta(self) -> TokenDelta:
        """The output since the last call, as one delta."""
        delta = TokenDelta(
            request_id=self.request_id,
            token_ids=tuple(self.out_ids),
            text=self.out_text,
            finish=self.finish,
            error=self.error,
            cached_prompt_tokens=(self.cached_prompt_tokens or 0) if self.report_cached else None,
            logprobs=self.out_logprobs,
            prompt_logprobs=self._take_prompt_logprobs(),
            draft_tokens_proposed=self.draft_proposed,
            draft_tokens_accepted=self.draft_accepted,
            speculative_steps=self.speculative_steps,
            drafter=self.drafter if self.speculative_steps else None,
        )
        self.out_ids, self.out_text, self.report_cached = [], "", False
        self.draft_proposed = self.draft_accepted = self.speculative_steps = 0
        if self.out_logprobs is not None:
            self.out_logprobs = []
        return delta

    def _take_prompt_logprobs(self) -> list[TokenLogprob] | None:
        """The prompt's logprobs, once, on the delta that carries the first generated token."""
        if self.prompt_logprobs is None or self.prompt_logprobs_sent or not self.out_ids:
            return None
        self.prompt_logprobs_sent = True
        return self.prompt_logprobs


@dataclass(frozen=True, slots=True)
class Chunk:
    """Positions [start, start + num_tokens) of one sequence, computed in one step. With a
    ``draft`` (speculative decoding) the chunk is the sequence's last token followed by the
    drafted tokens, which are not the sequence's own until the step's logits accept them."""

    seq: Sequence
    start: int
    num_tokens: int
    draft: tuple[int, ...] = ()

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so its logits pick the next one."""
        return self.start + self.num_tokens - len(self.draft) == len(self.seq.token_ids)

    @property
    def num_sample_rows(self) -> int:
        """Rows whose logits the step returns: every drafted position and the last token's
        (1 without a draft), or none for a prefill chunk short of the end."""
        return 1 + len(self.draft) if self.samples else 0

    def token_ids(self) -> list[int]:
        """The tokens the chunk computes."""
        own = self.num_tokens - len(self.draft)
        return [*self.seq.token_ids[self.start : self.start + own], *self.draft]
