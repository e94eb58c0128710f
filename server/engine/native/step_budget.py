"""The default token budget of a step, sized from a profiled forward pass.

A short chat that arrives beside a long prompt waits for the step in flight
before its first token. On the 2-core AVX2 machine of issue 30, one step of
2,048 prefill tokens took seconds there, and a short chat beside a 7k-token
prompt waited 6.9 s (p50) for its first token. So unless
--max-num-batched-tokens is given, the engine times one forward pass of
PROBE_TOKENS prompt tokens at start-up (after a small one to warm up) and
scales the budget so that a step takes about STEP_TARGET_SECONDS, never above
DEFAULT_STEP_TOKENS (where steps are fast already) nor below what one decode
step of --max-num-seqs rows needs. A step's cost is nearly linear in its
tokens at these sizes (the projections and MLP dominate), so a quarter-size
probe keeps start-up short. The choice goes to the log.

Unless --kv-cache-memory is given, one more pass at the chosen budget
measures what a step's activations take (memory_profile.py), and the KV
cache is sized from what is left. Both passes run on a small probe pool,
before the real one exists.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

from longserve.server.engine.config import DEFAULT_STEP_TOKENS
from longserve.server.engine.native.kv_cache import BLOCK_SIZE, KvPool
from longserve.server.engine.native.kv_quant import FORMATS, CacheFormat
from longserve.server.engine.native.memory_profile import PeakMemory
from longserve.server.engine.native.scheduler import Chunk

log = logging.getLogger("longserve.engine")

STEP_TARGET_SECONDS = 0.5
PROBE_TOKENS = 512
WARM_UP_TOKENS = 32


def budget_for(probe_tokens: int, probe_seconds: float, least: int) -> int:
    """Tokens a step may hold so that it takes about STEP_TARGET_SECONDS, if `probe_tokens` took `probe_seconds`:
    a multiple of BLOCK_SIZE in [least, DEFAULT_STEP_TOKENS]."""
    fitting = int(probe_tokens * STEP_TARGET_SECONDS / max(probe_seconds, 1e-9)) // BLOCK_SIZE * BLOCK_SIZE
    return max(least, min(DEFAULT_STEP_TOKENS, fitting))


def time_a_step(runner, tokens: int) -> float:
    """Seconds for one forward pass of a `tokens`-token prompt chunk in the pool's first blocks (nothing is
    cached yet; later writes overwrite them), after a small pass to warm up."""
    blocks = -(-tokens // BLOCK_SIZE)
    runner.pool.prepare(blocks - 1)
    probe = SimpleNamespace(all_ids=[0] * tokens, block_table=list(range(blocks)),
                            positions=runner.positions.for_sequence(None, tokens))
    runner.run([], [Chunk(probe, 0, min(tokens, WARM_UP_TOKENS))])
    started = time.perf_counter()
    runner.run([], [Chunk(probe, 0, tokens)])
    return time.perf_counter() - started


def profiled_budget(runner, max_model_len: int, max_num_seqs: int) -> int:
    probe_tokens = min(PROBE_TOKENS, max_model_len, runner.pool.num_tokens)
    seconds = time_a_step(runner, probe_tokens)
    budget = budget_for(probe_tokens, seconds, least=max_num_seqs)
    log.info("step budget: a forward pass of %d tokens took %.3f s here; --max-num-batched-tokens %d, so that a "
             "step takes about %.1f s at most (pass --max-num-batched-tokens to choose)", probe_tokens, seconds, budget,
             STEP_TARGET_SECONDS)
    return budget


def probe_pool(facts, dtype, device, near_keys: bool, tokens: int, cache: CacheFormat = FORMATS["auto"]) -> KvPool:
    """A pool just large enough for the start-up passes of `tokens` tokens, in the cache's own format (so the
    passes pay for quantizing and reading back as the real steps will)."""
    return KvPool(facts.num_layers, facts.num_kv_heads, facts.head_dim, -(-tokens // BLOCK_SIZE), dtype, device,
                  near_keys=near_keys, cache=cache)


def profile_start_up(runner, max_num_batched_tokens: int | None, kv_cache_memory: float | None, max_model_len: int,
                     max_num_seqs: int) -> tuple[int, int]:
    """(the step's token budget, the bytes a step of that many tokens takes beyond the weights): the budget as
    given or from profiled_budget; the bytes 0 when --kv-cache-memory is given, else the peak over these passes,
    scaled up linearly where the probe pool holds fewer tokens than the budget."""
    with PeakMemory(runner.device) as peak:
        step_tokens = max_num_batched_tokens or profiled_budget(runner, max_model_len, max_num_seqs)
        measured = 0 if kv_cache_memory else min(step_tokens, runner.pool.num_tokens)
        if measured:
            time_a_step(runner, measured)
    activation_bytes = peak.bytes * step_tokens // measured if measured else 0
    if measured:
        log.info("activations: a step of %d tokens took %.0f MiB beyond the weights (a pass of %d measured); the KV "
                 "cache leaves them room", step_tokens, activation_bytes / 2**20, measured)
    return step_tokens, activation_bytes
