"""The native engine: PyTorch + transformers, continuous batching, CPU or CUDA.

One background thread runs the model, step after step, and reads top to
bottom: schedule (scheduler.py: which decodes and prefill chunks fit the
token budget and the KV-cache blocks), run (model_runner.py: one forward pass
for the whole step), postprocess (the scheduler records what was computed;
tokens are sampled and taken; groups of rows, NBCE and beams, take their step
through one interface, row_group.py). The asyncio side submits sequences
under a lock and reads its deltas from an asyncio queue the thread feeds
through `call_soon_threadsafe`. Aborts are recorded by the asyncio side and
applied by the thread at the start of its next step, so a sequence leaves the
batch and frees its blocks there.

A failure in one request's part of a step fails that request alone and the
loop goes on (isolation.py); only a fault that leaves the engine unusable
(out of memory, CUDA) stops it, and `on_dead` tells the server to exit 1.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator, Callable

import torch

from longserve.patches.model_facts import ModelFacts
from longserve.patches.rope import check_composes
from longserve.server.engine.base import EngineDead, GenerationRequest, SeqDelta, choice_deltas
from longserve.server.engine.native.beam_group import BeamGroup
from longserve.server.engine.native.block_manager import BlockManager
from longserve.server.engine.native.constraint import constraint_of, mask_logits
from longserve.server.engine.native.heap import give_back_freed_memory
from longserve.server.engine.native.isolation import by_request, is_fatal
from longserve.server.engine.native.kv_cache import sized_pool
from longserve.server.engine.native.kv_quant import cache_format
from longserve.server.engine.config import DEFAULT_STEP_TOKENS, EngineConfig
from longserve.server.engine.native.loading import eos_ids, load_model, pick_device, pick_dtype
from longserve.server.engine.native.model_runner import ModelRunner, StepLogits, check_servable
from longserve.server.engine.native.observe import SequenceMetrics
from longserve.server.engine.native.outbox import Outbox
from longserve.server.engine.native.nbce_group import NbceGroup
from longserve.server.engine.native.positions import Positions, served_position
from longserve.server.engine.native.sampler import prompt_logprobs, sample
from longserve.server.engine.native.scheduler import Scheduler, Step
from longserve.server.engine.native.sequence import Sequence
from longserve.server.engine.native.step_budget import probe_pool, profile_start_up
from longserve.server.engine.native.engine_thread import start_engine_thread
from longserve.server.log_ids import log_context

log = logging.getLogger("longserve.engine")


def ignore(delta: SeqDelta) -> None:
    """Where the silent rows of an NBCE request send their deltas."""


class NativeEngine:
    def __init__(self, config: EngineConfig, metrics=None, model=None, tokenizer=None):
        self.config = config
        self.model_name = config.model_name
        self.max_num_seqs = config.max_num_seqs
        self.device = pick_device(config.device)
        self.metrics = metrics
        self.observe = SequenceMetrics(metrics)
        self.outbox = Outbox(on_closed=self.abort)  # the deltas of a step, sent at its end
        self._lock = threading.RLock()  # _end takes it, also inside _fail_requests, which holds it
        self._wakeup = threading.Event()
        self._aborts: set[str] = set()
        self._fail_all_pending: tuple[str, int] | None = None  # fail_all's message and status, for the thread
        self._requests: dict[str, list[Sequence]] = {}
        self._stopped = False
        self._dead_reason: str | None = None
        self._heartbeat = time.monotonic()  # the loop's last sign of progress: a finished step, or an idle look
        self.on_dead: Callable[[str], None] | None = None  # the server's hook: exit so a supervisor restarts us
        self._thread = start_engine_thread(lambda: self._build(model, tokenizer), self._loop, "longserve-engine")

    def _build(self, model, tokenizer) -> None:
        """The model, its cache and scheduler, on the engine's thread (engine_thread.py says why)."""
        config = self.config
        owns_model = model is None
        if owns_model:
            model, tokenizer = load_model(config.model_path, self.device, pick_dtype(config.dtype, self.device))
        self.model, self.tokenizer, self.dtype = model, tokenizer, model.dtype
        model_config = model.config
        self.facts = ModelFacts.of(model_config)
        self.trained_len = self.facts.trained_len
        self.vocab_size = self.facts.vocab_size
        self.position = served_position(config.position, model_config, self.trained_len)
        self.max_model_len = config.max_model_len or self.position.target_len(self.trained_len)
        check_composes(self.position, self.facts.rope_type)
        if warning := self.position.past_reach(self.trained_len, self.max_model_len):
            log.warning(warning)
        self.eos_token_ids = eos_ids(model, tokenizer)
        check_servable(model_config, self.max_model_len)
        self.positions = Positions(model, self.position, self.device)
        # the start-up passes run on a probe pool; the real one is sized from what they took (memory_profile.py)
        cache, probe_tokens = cache_format(config.kv_cache_dtype), config.max_num_batched_tokens or DEFAULT_STEP_TOKENS
        self.runner = ModelRunner(model, probe_pool(self.facts, self.dtype, self.device, self.position.clipped,
                                                    min(self.max_model_len, probe_tokens), cache),
                                  self.positions, owns_model=owns_model)
        step_tokens, activation_bytes = profile_start_up(self.runner, config.max_num_batched_tokens, config.kv_cache_memory,
                                                         self.max_model_len, config.max_num_seqs)
        self.pool = sized_pool(self.facts, self.dtype, self.device, config.kv_cache_memory, self.max_model_len,
                               near_keys=self.position.clipped, budget_near_keys=config.request_rerope,
                               activation_bytes=activation_bytes,
                               utilization=config.gpu_memory_utilization, cache=cache)
        self.runner.use_pool(self.pool)
        self.blocks = BlockManager(self.pool, prefix_caching=config.enable_prefix_caching)
        self.observe.watch(self.blocks, self.pool)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_waiting, step_tokens,
                                   config.prefill_chunk, self.max_model_len)
        self.generator = torch.Generator()  # on the host: it gives each unseeded sampled row one uniform number
        self.generator.seed()

    # ---- the asyncio side -------------------------------------------------

    def describe(self) -> dict:
        return {
            "engine": "native",
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_model_len": self.max_model_len,
            "trained_len": self.trained_len,
            "position": self.position.describe(),
            "kv_cache_tokens": self.pool.num_tokens,
            "kv_cache_dtype": self.pool.cache.name,
            "prefix_caching": self.blocks.prefix_caching,
        }

    def is_alive(self) -> bool:
        return self._dead_reason is None and self._thread.is_alive()

    def step_age(self) -> float:
        return time.monotonic() - self._heartbeat

    def fail_all(self, message: str, status: int = 503) -> None:
        """Applied by the engine thread at its next step, as aborts are (a sequence may be mid-step now)."""
        with self._lock:
            if self._thread.is_alive():
                self._fail_all_pending = (message, status)
            else:
                self._fail_requests(list(self._requests), message, status)
                self.outbox.flush()
        self._wakeup.set()

    def generate(self, request: GenerationRequest) -> AsyncIterator[SeqDelta]:
        if not self.is_alive():
            raise EngineDead(self._dead_reason or "the engine thread has stopped")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[SeqDelta] = asyncio.Queue()
        emit = self.outbox.sink(loop, queue, request.request_id)
        if request.nbce is not None:  # row 0 talks to the client, the others follow silently
            seqs = [self._new_sequence(request, p, index=0, emit=emit if row == 0 else ignore) for row, p in enumerate(request.prompts)]
            NbceGroup(seqs, request.nbce)
        elif request.beam_search:
            seqs = [self._new_sequence(request, request.prompts[0], index=i, emit=emit) for i in range(request.n)]
            BeamGroup(seqs, request.n)
        else:
            seqs = [
                self._new_sequence(request, prompt, index=p * request.n + i, emit=emit)
                for p, prompt in enumerate(request.prompts)
                for i in range(request.n)
            ]
        with self._lock:
            self.scheduler.add(seqs)  # raises EngineOverloaded when the queue is full
            self._requests[request.request_id] = seqs
        self._wakeup.set()
        return choice_deltas(queue, request.num_choices, lambda: self.abort(request.request_id))

    def _new_sequence(self, request: GenerationRequest, prompt: list[int], index: int, emit) -> Sequence:
        return Sequence(
            request_id=request.request_id,
            index=index,
            prompt_ids=list(prompt),
            params=request.params,
            emit=emit,
            tokenizer_backend=self.tokenizer.backend_tokenizer,
            eos_token_ids=self.eos_token_ids,
            seed=None if request.params.seed is None else request.params.seed + index,
            constraint=constraint_of(request, self.config.grammar_step_timeout),
            positions=self.positions.for_sequence(request.position, len(prompt) + request.params.max_tokens),
            log_id=request.log_id,
        )

    def check_grammar(self, spec) -> None:
        """Every grammar structured.py compiles is held here: xgrammar's, and llguidance's for the rest."""

    def check_position(self, spec) -> None:
        check_composes(spec, self.facts.rope_type)
        if spec.type == "dca":
            spec.chunk_sizes(self.trained_len)
        if spec.clipped and not self.pool.budgets_near_keys:
            raise ValueError(f"this server was started with --no-request-rerope: position type {spec.type!r} needs "
                             f"a near-key plane its KV cache has no room for; send a scaled type, or leave position out")

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._requests:
                self._aborts.add(request_id)
        self._wakeup.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    # ---- the engine thread -----------------------------------------------

    def _loop(self) -> None:
        worked_since_trim = False
        try:
            while not self._stopped:
                self._wakeup.clear()
                with self._lock:
                    self._apply_aborts()
                    step = self.scheduler.schedule()
                    self.observe.queue(self.scheduler)
                    if step.starved:
                        self._fail_requests(list(dict.fromkeys(seq.request_id for seq in step.starved)),
                                            "the KV cache is full; raise --kv-cache-memory or lower max_tokens", 503)
                if step.empty:
                    self.outbox.flush()
                    self._heartbeat = time.monotonic()
                    if not self._wakeup.wait(timeout=1.0) and worked_since_trim:  # idle a whole second
                        give_back_freed_memory()
                        worked_since_trim = False
                    continue
                self._step(step)
                self.outbox.flush()
                self._heartbeat = time.monotonic()
                worked_since_trim = True
        except BaseException as exc:  # the engine is dead: fail every request, say why
            log.exception("engine loop died")
            self._dead_reason = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._fail_requests(list(self._requests), f"the engine stopped: {self._dead_reason}", 503)
            self.outbox.flush()
            if self.on_dead is not None:
                self.on_dead(self._dead_reason)

    def _fail_requests(self, request_ids: list[str], message: str, status: int) -> None:
        """End these requests with an error delta and free their blocks (the lock is held)."""
        for request_id in request_ids:
            for seq in self._requests.pop(request_id, []):
                if seq.finish_reason is None or seq.block_table:  # not ended yet, or ended but not yet out
                    self._end([seq], "error", error=message, status=status, override=True)  # over its own reason

    def _isolated(self, seqs: list[Sequence], work: Callable[[], None]) -> None:
        """Run `work` for the requests of `seqs`; if it raises, those requests fail and the loop goes on."""
        try:
            work()
        except Exception as exc:
            if is_fatal(exc):
                raise
            request_ids = list(dict.fromkeys(seq.request_id for seq in seqs))
            with log_context(seqs[0].log_id):
                log.exception("request %s failed in its step; the engine goes on", ", ".join(request_ids))
            status = getattr(exc, "status", 500)  # 4xx: the request's own doing, said in its own words
            with self._lock:
                self._fail_requests(request_ids, str(exc) if status < 500 else f"{type(exc).__name__}: {exc}", status)

    def _apply_aborts(self) -> None:
        if self._fail_all_pending is not None:
            self._fail_requests(list(self._requests), *self._fail_all_pending)
            self._fail_all_pending = None
        for request_id in self._aborts:
            for seq in self._requests.pop(request_id, []):
                if seq.finish_reason is None:
                    self._end([seq], "abort", tell_client=False)  # the client left
        self._aborts.clear()

    def _step(self, step: Step) -> None:
        try:
            logits = self.runner.run(step.decode, step.chunks)
        except Exception as exc:
            if is_fatal(exc):
                raise
            # Which request broke the step? Each one's part alone: the culprit fails, the rest go on.
            # Nothing moved yet: rerunning writes the same cache positions again.
            log.warning("a step of %d tokens failed (%s); running each request alone", step.num_tokens, exc)
            for part in by_request(step):
                seqs = part.decode + [chunk.seq for chunk in part.chunks]
                self._isolated(seqs, lambda part=part: self._postprocess(part, self.runner.run(part.decode, part.chunks)))
            return
        self._postprocess(step, logits)

    def _postprocess(self, step: Step, logits: StepLogits) -> None:
        """The step ran: record it, then give every sequence with logits its token."""
        with self._lock:
            self.scheduler.computed(step)
        singles = [row for row, seq in enumerate(step.decode) if seq.group is None]
        ready = [step.decode[row] for row in singles]  # single sequences to sample
        ready_logits = []  # the logits rows of those among them that finished their prompts in this step
        row_of = {seq: row for row, seq in enumerate(step.decode)}
        for group in dict.fromkeys(seq.group for seq in step.decode if seq.group is not None):
            if group.leader.finish_reason is not None:  # its request failed earlier in this step
                continue
            rows_logits = logits.decode[[row_of[row] for row in group.rows]]
            self._isolated(group.rows, lambda group=group, rows_logits=rows_logits: self._advance(group, rows_logits))
        for chunk, chunk_logits in zip(step.chunks, logits.chunks):
            seq = chunk.seq
            if chunk.every_position:  # scores of the prompt's own tokens 1..P-1, chunk by chunk
                top = seq.params.prompt_logprobs
                seq.prompt_logprobs += prompt_logprobs(chunk_logits, seq.prompt_ids[chunk.start + 1 : chunk.end + 1], top)
                chunk_logits = chunk_logits[-1]
            if not chunk.ends_prompt or seq.output_ids or seq.finish_reason is not None:  # mid-prompt, or resumed
                continue
            if seq.params.max_tokens == 0:  # scoring only (echo): nothing to sample
                self._end([seq], "length")
            elif seq.group is None:
                ready.append(seq)
                ready_logits.append(chunk_logits)
            else:
                first = seq.group.prompt_cached(seq, chunk_logits)
                if first is not None:
                    with self._lock:
                        self.scheduler.start_decoding(seq.group.rows)
                    self._isolated(seq.group.rows, lambda group=seq.group, first=first: self._advance(group, first, first=True))
        if ready:
            parts = ([logits.decode_rows(singles)] if singles else []) + ([torch.stack(ready_logits)] if ready_logits else [])
            self._accept(ready, parts[0] if len(parts) == 1 else torch.cat(parts))

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample a token for each of `seqs` (rows of `logits`) and take it. Sampling is pure, so when the
        batch's sampling fails, each row samples alone and only the rows that still fail lose their request."""
        try:
            tokens, records = self.sample(logits, seqs)
        except Exception as exc:
            if is_fatal(exc):
                raise
            for row, seq in enumerate(seqs):
                self._isolated([seq], lambda row=row, seq=seq: self._sample_and_take(seq, logits[row : row + 1]))
            return
        for seq, token, record in zip(seqs, tokens, records):
            self._isolated([seq], lambda seq=seq, token=token, record=record: self._take(seq, token, record))

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]):
        """A token (and its logprob record) for each of `seqs` from rows of `logits`, within their keys if constrained."""
        if any(seq.constraint is not None for seq in seqs):  # on a copy: a row may sample again alone
            logits = mask_logits(logits.clone(), [seq.constraint for seq in seqs])
        return sample(logits, seqs, self.generator)

    def _sample_and_take(self, seq: Sequence, logits: torch.Tensor) -> None:
        tokens, records = self.sample(logits, [seq])
        self._take(seq, tokens[0], records[0])

    def _take(self, seq: Sequence, token: int, record) -> None:
        if seq.finish_reason is not None:  # its request failed earlier in this step
            return
        previous = seq.last_token_time
        seq.append(token, record)
        if seq.constraint is not None and seq.constraint.advance(token):
            seq.finish("stop", override=True)  # a whole key, or the grammar's end: the answer, even on the last allowed token
        self.observe.token(seq, previous)
        if seq.finish_reason is not None:
            self._end([seq], seq.finish_reason)
        else:
            self.emit(seq)

    def _advance(self, group, logits: torch.Tensor, first: bool = False) -> None:
        """One step of a group of rows (row_group.py), and what it asks for done."""
        actions = group.advance(logits, self.sample, self.tokenizer, first)
        if actions.forks:
            with self._lock:
                self.scheduler.fork([row for row, _ in actions.forks], [source for _, source in actions.forks])
        for row, previous in actions.took_token:
            self.observe.token(row, previous)
        if actions.finished is not None:
            self._end(group.rows, actions.finished, shown=actions.shown)
        else:
            for row in actions.shown:
                self.emit(row)

    def _end(self, seqs: list[Sequence], reason: str, shown: list[Sequence] | None = None, error: str | None = None,
             status: int = 500, tell_client: bool = True, override: bool = False) -> None:
        """Every way a sequence ends passes here: the scheduler takes `seqs` out (scheduler.finish), a request
        whose sequences have all ended is forgotten, and the metrics and (unless it left) the client hear of
        the `shown` ones (all of `seqs` unless told)."""
        with self._lock:
            self.scheduler.finish(seqs, reason, override)
            for request_id in dict.fromkeys(seq.request_id for seq in seqs):
                if all(other.finish_reason is not None for other in self._requests.get(request_id, [])):
                    self._requests.pop(request_id, None)
        for seq in seqs if shown is None else shown:
            self.observe.finished(seq)
            if tell_client:
                self.emit(seq, error=error, status=status)

    def emit(self, seq: Sequence, error: str | None = None, status: int = 500) -> None:
        delta = seq.take_delta(error=error, error_status=status)
        if delta is not None:
            seq.emit(delta)

