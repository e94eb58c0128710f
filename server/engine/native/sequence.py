"""One sequence: a prompt, the tokens generated so far, and the text they make.

A request with `n` choices becomes `n` sequences. Each one holds a table of
KV-cache blocks while it runs (block_manager.py) and turns its tokens into
text incrementally, holding back text that could still become a stop string.
Its state changes are the scheduler's (scheduler.py).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from tokenizers.decoders import DecodeStream

from longserve.server.engine.base import SamplingParams, SeqDelta, TokenLogprob

if TYPE_CHECKING:
    from longserve.server.engine.native.positions import SequencePositions


class Status(enum.Enum):
    WAITING = "waiting"  # queued (or preempted), holds no blocks
    PREFILLING = "prefilling"  # holds blocks, prompt partly in the cache
    PARKED = "parked"  # a group row waiting for the rest of its group
    DECODING = "decoding"  # prompt cached, one token per step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # the choice index within its request
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[SeqDelta], None]  # thread-safe sink for deltas
    tokenizer_backend: object  # a `tokenizers.Tokenizer`, for incremental decoding
    eos_token_ids: frozenset[int]
    positions: SequencePositions | None = None  # this sequence's rotary table, fixed for its life
    seed: int | None = None  # the request's seed plus the choice index: its sampled tokens' only source of chance
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)  # the KV-cache blocks holding positions 0, 16, 32, ...
    num_cached: int = 0  # tokens whose keys and values are in the cache
    cached_tokens: int = 0  # of the prompt, found in the prefix cache at admission (usage.prompt_tokens_details)
    preemptions: int = 0
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    last_token_time: float | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    group: Any = None  # an nbce_group.NbceGroup when this is one row of an NBCE request
    constraint: Any = None  # a constraint.SequenceConstraint: the output must be a trie's key, or match a grammar
    score: float | None = None  # beam search: the cumulative log-probability of the output
    context_ids: list[int] = field(default_factory=list)  # NBCE, row 0: the context each output token came from
    log_id: str = "-"  # the HTTP request's id (X-Request-Id), for the engine thread's log lines
    _sent_text: int = 0
    _sent_tokens: int = 0
    _pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    _decoder: DecodeStream | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_target(self) -> int:
        """Positions to cache before decoding: the prompt; after a preemption, everything but the last token."""
        return self.length - 1 if self.output_ids else len(self.prompt_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def append(self, token_id: int, logprob: TokenLogprob | None) -> None:
        """Add one sampled token; decide whether the sequence is finished."""
        now = time.perf_counter()
        self.first_token_time = self.first_token_time or now
        self.last_token_time = now
        self.output_ids.append(token_id)
        if logprob is not None:
            self._pending_logprobs.append(logprob)
        if token_id in self.params.stop_token_ids or (token_id in self.eos_token_ids and not self.params.ignore_eos):
            self.finish_reason = "stop"
            return
        self._append_text(token_id)
        if self.finish_reason is None and len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"

    def _append_text(self, token_id: int) -> None:
        if self._decoder is None:
            self._decoder = DecodeStream(skip_special_tokens=True)
        piece = self._decoder.step(self.tokenizer_backend, token_id)
        if not piece:
            return
        search_from = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += piece
        for stop in self.params.stop:
            at = self.text.find(stop, search_from)
            if at != -1:
                self.text = self.text[:at]
                self.finish_reason = "stop"
                search_from = at  # a later stop string cannot start after an earlier match

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.params.stop), default=0)

    def finish(self, reason: str, override: bool = False) -> None:
        """Why the output ends: the first reason wins, unless this one overrides it; the scheduler takes the
        sequence out."""
        self.finish_reason = reason if override else self.finish_reason or reason

    def take_delta(self, error: str | None = None, error_status: int = 500) -> SeqDelta | None:
        """The text and tokens not yet sent; None when there is nothing new."""
        done = self.finish_reason is not None
        safe_end = len(self.text) if done else max(self._sent_text, len(self.text) - self.max_stop_len + 1)
        if not self.params.stop:
            safe_end = len(self.text)
        text = self.text[self._sent_text : safe_end]
        token_ids = self.output_ids[self._sent_tokens :]
        if not done and not text and not token_ids:
            return None
        logprobs = None
        if self.params.logprobs is not None:
            logprobs, self._pending_logprobs = self._pending_logprobs, []
        first = self._sent_tokens == 0 and not self._sent_text
        context_ids = self.context_ids[self._sent_tokens :] if self.group is not None else None
        self._sent_text = safe_end
        self._sent_tokens = len(self.output_ids)
        return SeqDelta(
            index=self.index,
            text=text,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=self.finish_reason,
            cached_tokens=self.cached_tokens,
            completion_tokens=len(self.output_ids),
            error=error,
            error_status=error_status,
            prompt_logprobs=self.prompt_logprobs if first and self.params.prompt_logprobs is not None else None,
            context_ids=context_ids,
            entry=self.constraint.entry if self.constraint is not None and done else None,
            score=self.score if done else None,
        )
