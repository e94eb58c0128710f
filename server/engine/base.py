"""The interface every engine implements, and the plain data that crosses it.

The HTTP layer turns a request into a GenerationRequest of token ids and
SamplingParams, iterates `engine.generate(request)` for SeqDelta items, and
calls nothing else of the engine while generating. Breaking out of the
iteration (a client that went away) aborts the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol


class EngineOverloaded(Exception):
    """The waiting queue is full; the client should retry later (HTTP 429)."""


class EngineDead(Exception):
    """The engine loop has stopped; nothing can be served (HTTP 503)."""


class NeverFits(ValueError):
    """The request is larger than this server could ever hold, however idle (HTTP 400, not 429:
    retrying cannot help); the message names the limit."""


def check_fits(num_seqs: int, max_num_seqs: int, max_waiting: int) -> None:
    """NeverFits when `num_seqs` sequences exceed the batch and the queue together."""
    if num_seqs > max_num_seqs + max_waiting:
        raise NeverFits(f"the request needs {num_seqs} sequences (prompts x n); this server holds at most "
                        f"{max_num_seqs + max_waiting} (--max-num-seqs {max_num_seqs} + --max-waiting {max_waiting}); "
                        "lower n or send fewer prompts")


class Unsupported(ValueError):
    """The request asks for something this engine does not do (HTTP 400); the message says which engine does."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's: >1 discourages every token already in the prompt or the output
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass(frozen=True)
class KeyConstraint:
    """The output must be one key of `trie` (a patches.trie.TokenTrie); `end_token` ends a key."""

    trie: Any
    end_token: int


@dataclass(frozen=True)
class GrammarSpec:
    """Structured output: the text must match this grammar (server/extensions/structured.py).

    `kind` is vLLM's field name: json (value: a JSON schema), regex, choice (a
    list of strings), grammar (EBNF), structural_tag (xgrammar's, as JSON text), or json_object (any JSON
    object)."""

    kind: str
    value: Any
    compiled: Any = None  # xgrammar's CompiledGrammar, for the native engine; vLLM compiles its own


@dataclass
class GenerationRequest:
    """`n` choices for each prompt; choice index = prompt index * n + i.

    With `nbce` set, the prompts are instead the rows of one NBCE choice:
    row 0 the question alone, row k context k followed by the question.
    """

    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    n: int = 1
    position: Any = None  # a patches.rope.PositionSpec overriding the server's, or None
    nbce: Any = None  # a patches.nbce.NbceParams: decode one answer over the rows
    constraint: KeyConstraint | None = None  # the output must be one of its keys
    beam_search: bool = False  # with a constraint: the n best distinct keys, best first
    grammar: GrammarSpec | None = None  # structured output: the text must match it
    log_id: str = "-"  # the HTTP request's id (X-Request-Id), for the engine's log lines about it

    @property
    def num_choices(self) -> int:
        return 1 if self.nbce is not None else len(self.prompts) * self.n


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely (token id, logprob) at that step


@dataclass
class SeqDelta:
    """What one sequence (choice `index`) produced since its previous delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # None while running; "stop", "length", "abort" or "error" at the end
    completion_tokens: int
    cached_tokens: int = 0  # of its prompt, read from the prefix cache
    error: str | None = None
    error_status: int = 500  # the HTTP status the error maps to: 500 a failed step, 503 a server shutting down
    prompt_logprobs: list[TokenLogprob] | None = None  # with the first delta, when asked for
    context_ids: list[int] | None = None  # NBCE: the context (0-based) each of token_ids came from
    entry: int | None = None  # constrained: the key's entry, once a whole key is out (last delta)
    score: float | None = None  # beam search: the key's cumulative log-probability


async def choice_deltas(queue, choices: int, on_early_exit: Callable[[], None]) -> AsyncIterator[SeqDelta]:
    """The deltas an engine puts on `queue`, until every one of `choices` has finished;
    leaving early (a client that went away) calls on_early_exit."""
    remaining = choices
    try:
        while remaining:
            delta = await queue.get()
            if delta.finish_reason is not None:
                remaining -= 1
            yield delta
    finally:
        if remaining:
            on_early_exit()


class Engine(Protocol):
    model_name: str
    max_model_len: int
    max_num_seqs: int
    trained_len: int
    vocab_size: int
    tokenizer: Any

    def generate(self, request: GenerationRequest) -> AsyncIterator[SeqDelta]:
        """Queue the request now (raising EngineOverloaded or EngineDead at once)
        and return the stream of its deltas; leaving the stream early aborts it."""

    def abort(self, request_id: str) -> None: ...

    def check_position(self, spec) -> None:
        """Raise ValueError (why, in words) if a request may not use PositionSpec `spec` on this model."""

    def check_grammar(self, spec: GrammarSpec) -> None:
        """Raise ValueError (why, in words) if this engine could not hold an answer to `spec`."""

    def is_alive(self) -> bool: ...

    def step_age(self) -> float:
        """Seconds since the engine last made progress while it had work; 0 when idle."""

    def fail_all(self, message: str, status: int) -> None:
        """End every request in flight with an error delta (the server is shutting down)."""

    def describe(self) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...
