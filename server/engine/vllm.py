"""The vLLM engine: vLLM's AsyncLLM in-process, behind longserve's Engine interface.

vLLM brings the paged cache, its scheduler and its kernels; this file maps
requests and results between the two worlds, and nothing more:

- one vLLM request per choice (prompt x n), with a delta output kind, so
  streams, seeds and aborts work per choice as in the native engine;
- position settings become vLLM model overrides where vLLM has the same
  rotary type (positions_for_vllm); log-n is patches/vllm_plugin.py, switched
  on through the environment vLLM's processes inherit; ReRoPE is refused at
  start-up, naming the native engine;
- --kv-cache-dtype passes through where vLLM's backend on this device stores
  that dtype, and is refused at start-up in one line where not
  (cache_dtype_args), never ignored;
- a trie constraint is patches/vllm_trie.py, a vLLM logits processor; a
  small trie travels inside the request, a large one as a file under
  --data-dir, which workers on other nodes see through the shared volume
  (trie_files.py);
- what vLLM cannot do here (NBCE rows, beam search over keys, a per-request
  position) is refused per request with a 400 that names the native engine.

TTFT, inter-token and end-to-end latencies are observed from the deltas, so
/metrics has the same names with either engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import AsyncIterator

from longserve.patches.model_facts import ModelFacts
from longserve.patches.rope import PositionSpec, check_composes
from longserve.server.engine.config import DEFAULT_STEP_TOKENS, EngineConfig
from longserve.server.engine.trie_files import TrieFiles
from longserve.server.extensions.schema_keywords import xgrammar_misses
from longserve.server.engine.base import (EngineDead, EngineOverloaded, GenerationRequest, GrammarSpec, KeyConstraint, SamplingParams, SeqDelta,
                                TokenLogprob, Unsupported, check_fits, choice_deltas)

log = logging.getLogger("longserve.vllm")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def positions_for_vllm(spec: PositionSpec, head_dim: int, rope_base: float, trained_len: int, max_model_len: int) -> dict:
    """hf_overrides that make vLLM compute `spec`; ValueError where vLLM has no such rotary type.

    vLLM sizes its cos/sin table by max_position_embeddings, not by the scaled
    length: past the trained length it would read out of bounds (garbage on
    CPU, no error). So every scaled type also raises max_position_embeddings
    to the served length. log-n is not an override: see patches/vllm_plugin.py.
    """
    if spec.clipped:
        raise ValueError(f"{spec.type} needs the native engine (vLLM caches rotated keys); use --engine native")
    if spec.type == "dca":
        raise ValueError("dca (Dual Chunk Attention) needs the native engine: vLLM 0.32's V1 engine has no backend "
                         "for it; use --engine native")
    if spec.type == "rope" or spec.factor == 1.0:
        return {}
    length = {"max_position_embeddings": max(trained_len, max_model_len)}
    if spec.type == "linear":
        return {**length, "rope_parameters": {"rope_type": "linear", "factor": spec.factor, "rope_theta": rope_base}}
    if spec.type == "ntk":
        return {**length, "rope_parameters": {"rope_type": "ntk", "factor": spec.factor, "rope_theta": rope_base}}
    if spec.type == "ntk-mixed":
        return {**length, "rope_parameters": {"rope_type": "ntk", "factor": spec.factor, "mixed_b": spec.b, "rope_theta": rope_base}}
    if spec.type == "yarn":
        return {**length, "rope_parameters": {"rope_type": "yarn", "factor": spec.factor, "rope_theta": rope_base,
                                              "original_max_position_embeddings": trained_len,
                                              "beta_fast": spec.beta_fast, "beta_slow": spec.beta_slow}}
    if spec.type in ("dynamic", "ntk-old"):  # a base change; dynamic's scale fixed by the served length
        scale = spec.factor
        if spec.type == "dynamic":
            scale = max(1.0, spec.factor * max_model_len / trained_len - (spec.factor - 1))
        return {**length, "rope_parameters": {"rope_type": "default", "rope_theta": rope_base * scale ** (head_dim / (head_dim - 2))}}
    raise ValueError(f"the vLLM engine has no {spec.type!r} positions; use --engine native")


CPU_KV_CACHE_GIB = 2  # vLLM's CPU KV-cache space (VLLM_CPU_KVCACHE_SPACE) when --kv-cache-memory is not given


def structured_outputs(grammar: GrammarSpec):
    """vLLM's own structured outputs for the same spec (vLLM compiles it with xgrammar in its engine process)."""
    from vllm.sampling_params import StructuredOutputsParams

    if grammar.kind == "json_object":
        return StructuredOutputsParams(json={"type": "object"})  # as the native engine compiles it: compact
    return StructuredOutputsParams(**{grammar.kind: grammar.value})


def cpu_thread_binding(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers: this process's CPUs in `ranks` contiguous shares.
    vLLM binds one worker per NUMA node by itself, and refuses more workers than nodes (a one-node machine
    could not run --tensor-parallel-size 2 without this)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < ranks:
        raise ValueError(f"{ranks} CPU workers (tensor x pipeline x data parallel size) need a CPU each; "
                         f"this process may use {len(cpus)}: lower the sizes")
    share = len(cpus) // ranks
    return "|".join(",".join(str(cpu) for cpu in cpus[rank * share:(rank + 1) * share]) for rank in range(ranks))


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def kv_cache_args(config: EngineConfig) -> dict:
    """--kv-cache-memory on CUDA: vLLM's own kv_cache_memory_bytes (on CPU it is VLLM_CPU_KVCACHE_SPACE)."""
    if config.kv_cache_memory and torch_has_cuda():
        return {"kv_cache_memory_bytes": int(config.kv_cache_memory * 2**30)}
    return {}


def cache_dtype_args(name: str, head_dim: int, cuda: bool) -> dict:
    """--kv-cache-dtype as vLLM 0.32 takes it where its backend on this device stores that dtype; a ValueError
    that says what to change where it does not (vLLM would otherwise fail deep in its engine process)."""
    if name == "auto":
        return {}
    if cuda:  # int8 is vLLM's per-(token, head) int8, which its Triton backend stores
        return {"kv_cache_dtype": "int8_per_token_head" if name == "int8" else name}
    if name == "int8":
        raise ValueError("--kv-cache-dtype int8: vLLM's CPU backend stores fp8 only; pass fp8 (or fp8_e4m3, fp8_e5m2) "
                         "or use --engine native, which stores int8 on any device")
    import torch

    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        raise ValueError(f"--kv-cache-dtype {name}: vLLM's CPU backend stores fp8 only on CPUs with AVX-512 or AMX, "
                         "and this one has neither; use --engine native, which stores it on any CPU")
    if head_dim % 32:
        raise ValueError(f"--kv-cache-dtype {name}: vLLM's CPU backend stores fp8 only for head sizes divisible by 32, "
                         f"and this model's is {head_dim}; use --engine native")
    return {"kv_cache_dtype": name}


class VllmEngine:
    def __init__(self, config: EngineConfig, metrics=None):
        from transformers import AutoConfig, AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from longserve.patches.vllm_plugin import LOGN_ENV
        from longserve.patches.vllm_trie import KeyLogitsProcessor

        self.config, self.metrics = config, metrics
        self.model_name = config.model_name
        self.max_num_seqs = config.max_num_seqs
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        facts = ModelFacts.of(AutoConfig.from_pretrained(config.model_path))
        self.trained_len = facts.trained_len
        self.vocab_size = facts.vocab_size
        self.position = config.position
        self.max_model_len = config.max_model_len or self.position.target_len(self.trained_len)
        self.rope_type = facts.rope_type
        check_composes(self.position, self.rope_type)
        overrides = positions_for_vllm(self.position, facts.head_dim, facts.rope_base, self.trained_len, self.max_model_len)
        cache_dtype = cache_dtype_args(config.kv_cache_dtype, facts.head_dim, torch_has_cuda())
        if config.kv_cache_memory and not torch_has_cuda():  # vLLM on CPU reads its space from the environment, in GiB
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(config.kv_cache_memory)))
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
        ranks = config.tensor_parallel_size * config.pipeline_parallel_size * config.data_parallel_size
        if ranks > 1 and not torch_has_cuda():
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(ranks))
        # vLLM's engine process inherits the environment as it is now: this switches log-n on or off there.
        if self.position.logn:
            os.environ[LOGN_ENV] = str(self.trained_len)
        else:
            os.environ.pop(LOGN_ENV, None)
        args = AsyncEngineArgs(model=config.model_path, served_model_name=config.model_name, dtype=config.dtype,
                               max_model_len=self.max_model_len, max_num_seqs=config.max_num_seqs,
                               hf_overrides=overrides, enforce_eager=config.enforce_eager, disable_log_stats=True,
                               logits_processors=[KeyLogitsProcessor], max_num_batched_tokens=config.max_num_batched_tokens or DEFAULT_STEP_TOKENS,
                               enable_prefix_caching=config.enable_prefix_caching, **kv_cache_args(config), **cache_dtype,
                               **config.distributed,
                               # compact JSON, as the native engine writes it: no whitespace runs to sample into
                               structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
        # as `vllm serve` builds it: the usage context picks vLLM's defaults for an API server (batched tokens, ...)
        self.engine = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
        self._in_flight: dict[str, list[str]] = {}  # our request id -> its vLLM request ids (choices) not yet ended
        self._last_progress = time.monotonic()  # the last output of any request, or the start of the first in flight
        self._ended: tuple[str, int] | None = None  # fail_all's message and status, for the streams it ends
        self.on_dead = None  # the server's hook (http_server.py): exit 1 so that a supervisor restarts us
        self._tries = TrieFiles(config.data_dir)

    # ---- Engine interface ---------------------------------------------------

    def describe(self) -> dict:
        import vllm

        return {"engine": "vllm", "vllm_version": vllm.__version__, "max_model_len": self.max_model_len,
                "kv_cache_dtype": self.config.kv_cache_dtype,
                "trained_len": self.trained_len, "position": self.position.describe()}

    def is_alive(self) -> bool:
        return not getattr(self.engine, "errored", False)

    def generate(self, request: GenerationRequest) -> AsyncIterator[SeqDelta]:
        if not self.is_alive():
            raise EngineDead("the vLLM engine has stopped")
        self._refuse_unsupported(request)
        check_fits(request.num_choices, self.max_num_seqs, self.config.max_waiting)
        running = self._num_in_flight()
        if running + request.num_choices > self.max_num_seqs + self.config.max_waiting:
            raise EngineOverloaded(f"the server is full: {running} sequences in vLLM (--max-num-seqs {self.max_num_seqs}, "
                                   f"--max-waiting {self.config.max_waiting}); retry later")
        choices = [(p * request.n + i, prompt) for p, prompt in enumerate(request.prompts) for i in range(request.n)]
        if not running:
            self._last_progress = time.monotonic()
        self._in_flight[request.request_id] = [f"{request.request_id}-{index}" for index, _ in choices]
        self._report_queue()
        return self._stream(request, choices)

    def _num_in_flight(self) -> int:
        return sum(len(ids) for ids in self._in_flight.values())

    def step_age(self) -> float:
        return time.monotonic() - self._last_progress if self._num_in_flight() else 0.0

    def fail_all(self, message: str, status: int = 503) -> None:
        """vLLM ends each aborted request's stream; `_choice` then reports it as this error."""
        self._ended = (message, status)
        for request_id in list(self._in_flight):
            self.abort(request_id)

    def check_position(self, spec) -> None:
        check_composes(spec, self.rope_type)  # a per-request position is then refused anyway (native only)

    def check_grammar(self, spec: GrammarSpec) -> None:
        """vLLM runs every grammar on xgrammar here: its "auto" backend, which would send some schemas to
        llguidance, refuses the compact JSON (disable_any_whitespace) that keeps a sampler out of whitespace runs.
        So the schemas only llguidance holds are refused, never passed unenforced."""
        if spec.kind == "json" and (missed := xgrammar_misses(spec.value)):
            raise ValueError(f"{missed} is not enforced by this server's engine (vLLM's xgrammar); "
                             "the native engine holds it (--engine native)")

    def abort(self, request_id: str) -> None:
        ids = self._in_flight.pop(request_id, [])
        if ids:
            asyncio.get_running_loop().create_task(self.engine.abort(ids))

    def shutdown(self) -> None:
        self.engine.shutdown()
        self._tries.cleanup()

    # ---- mapping ------------------------------------------------------------

    @staticmethod
    def _refuse_unsupported(request: GenerationRequest) -> None:
        for present, what in ((request.nbce is not None, "contexts (NBCE)"),
                              (request.beam_search, "use_beam_search"), (request.position is not None, "a per-request position")):
            if present:
                raise Unsupported(f"{what} needs the native engine; this server runs vLLM (start it with --engine native)")

    def _sampling_params(self, params: SamplingParams, index: int, constraint: KeyConstraint | None = None,
                         grammar: GrammarSpec | None = None):
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            n=1, max_tokens=max(params.max_tokens, 1), temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0, min_p=params.min_p,
            seed=None if params.seed is None else params.seed + index, stop=params.stop or None,
            stop_token_ids=params.stop_token_ids or None, ignore_eos=params.ignore_eos,
            logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs,
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            logit_bias=params.logit_bias or None, output_kind=RequestOutputKind.DELTA,
            extra_args=None if constraint is None else self._tries.args(constraint),
            structured_outputs=None if grammar is None else structured_outputs(grammar),
        )

    async def _stream(self, request: GenerationRequest, choices: list[tuple[int, list[int]]]) -> AsyncIterator[SeqDelta]:
        if len(choices) == 1:  # the common case: nothing between vLLM's stream and the client's
            deltas = self._choice(request, *choices[0])
            finished = False
            try:
                async for delta in deltas:
                    finished = delta.finish_reason is not None
                    yield delta
            finally:
                if not finished:  # the client left: vLLM stops this request now
                    self.abort(request.request_id)
                await deltas.aclose()
                self._in_flight.pop(request.request_id, None)
            return
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(self._choice(request, index, prompt), queue)) for index, prompt in choices]
        deltas = choice_deltas(queue, len(tasks), lambda: self.abort(request.request_id))
        try:
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()  # now, not when collected: a client that left aborts its vLLM requests
            for task in tasks:
                task.cancel()
            self._in_flight.pop(request.request_id, None)

    @staticmethod
    async def _pump(deltas: AsyncIterator[SeqDelta], queue: asyncio.Queue) -> None:
        async for delta in deltas:
            await queue.put(delta)

    async def _choice(self, request: GenerationRequest, index: int, prompt: list[int]) -> AsyncIterator[SeqDelta]:
        """One vLLM request's deltas; a failure in vLLM ends it with an error delta."""
        params = request.params
        request_id = f"{request.request_id}-{index}"
        started, previous = time.perf_counter(), None
        completion_tokens, generated = 0, []
        first, finish = True, None
        try:
            if request.constraint is not None and not self._tries.holds(request.constraint.trie):  # once per trie
                await asyncio.to_thread(self._tries.hold, request.constraint.trie)
            async for output in self.engine.generate({"prompt_token_ids": prompt}, self._sampling_params(params, index, request.constraint, request.grammar), request_id):
                self._last_progress = time.monotonic()
                if self._ended is not None:
                    break
                piece = output.outputs[0]
                completion_tokens += len(piece.token_ids)
                if request.constraint is not None:  # to find the key's entry at the end
                    generated += piece.token_ids
                now = time.perf_counter()
                if self.metrics and piece.token_ids:
                    if previous is None:
                        self.metrics.observe_first_token(now - started)
                    else:
                        self.metrics.observe_inter_token(now - previous)
                    previous = now
                finish = piece.finish_reason if output.finished else None
                if params.max_tokens == 0:  # scoring only: vLLM generated one token we do not report
                    piece.token_ids, piece.text, completion_tokens, finish = [], "", 0, "length"
                delta = SeqDelta(
                    index=index, text=piece.text, token_ids=list(piece.token_ids),
                    logprobs=self._logprobs(piece.token_ids, piece.logprobs, params.logprobs) if params.logprobs is not None else None,
                    finish_reason=finish, completion_tokens=completion_tokens,
                    cached_tokens=getattr(output, "num_cached_tokens", None) or 0,
                    prompt_logprobs=(self._logprobs(prompt[1:], (output.prompt_logprobs or [None])[1:], params.prompt_logprobs)
                                     if first and params.prompt_logprobs is not None else None),
                )
                if finish == "stop" and request.constraint is not None:
                    delta.entry = request.constraint.trie.entry_for(generated, request.constraint.end_token)
                first = False
                yield delta
                if finish is not None:
                    return
            if self._ended is not None:  # fail_all: the server is shutting down
                finish = "error"
                yield SeqDelta(index=index, text="", token_ids=[], logprobs=None, finish_reason="error",
                               completion_tokens=completion_tokens, error=self._ended[0],
                               error_status=self._ended[1])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # vLLM failed this request: say so in the stream
            log.exception("vLLM request %s failed", request_id)
            if getattr(self.engine, "errored", False) and self.on_dead is not None:  # vLLM's engine itself is gone
                self.on_dead(f"{type(exc).__name__}: {exc}")
            finish = "error"
            yield SeqDelta(index=index, text="", token_ids=[], logprobs=None, finish_reason="error",
                           completion_tokens=completion_tokens, error=f"{type(exc).__name__}: {exc}")
        finally:
            ids = self._in_flight.get(request.request_id, [])
            if request_id in ids:
                ids.remove(request_id)
            self._report_queue()
            if self.metrics:  # a choice cancelled before it finished was aborted (the client left)
                self.metrics.observe_finished(e2e=time.perf_counter() - started, prompt_tokens=len(prompt),
                                              generation_tokens=completion_tokens, reason=finish or "abort")

    def _report_queue(self) -> None:
        """vLLM schedules out of our sight: up to --max-num-seqs of our choices count as running, the rest as waiting."""
        if self.metrics:
            in_flight = self._num_in_flight()
            running = min(in_flight, self.max_num_seqs)
            self.metrics.set_queue(running=running, waiting=in_flight - running)

    @staticmethod
    def _logprobs(token_ids, steps, top: int) -> list[TokenLogprob]:
        """vLLM's per-step {token: Logprob} (the chosen token and the `top` best) as our records."""
        records = []
        for token, step in zip(token_ids, steps or []):
            ranked = sorted((lp.rank, t, lp.logprob) for t, lp in step.items() if lp.rank is not None and lp.rank <= top)
            records.append(TokenLogprob(token, step[token].logprob, [(t, logprob) for _, t, logprob in ranked]))
        return records
