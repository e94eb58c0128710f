"""The attention step: where positions meet the cache, once per layer for the whole step.

Built once per step from its inputs (step_inputs.py) and its Encoding
(positions.py); the model runner calls it once per layer with the step's flat
q [tokens, heads, d], k and v [tokens, kv_heads, d]. It turns q and k, writes
every token's key and value into its slot in one index_copy per plane
(planes are [kv_heads, slots, d], kv_cache.py; quantized on the way in with
--kv-cache-dtype int8 or fp8), and
runs the backend's calls (attention_backend.py):

- plain and scaled-RoPE rows: one call over the keys cached after rotation,
  distances [0, inf);
- rows on ReRoPE, Leaky ReRoPE or Self-Extend: two calls, the near plane for
  distances [0, w) and the far plane for [w, inf), merged exactly by their
  log-sum-exps (patches/rerope.py's merge). Rows with different windows,
  leaks and groups share both calls.
- DCA rows: three calls over the one key plane (keys at their place in their
  chunk), for keys in the query's own chunk, the chunk before and earlier
  chunks, each with its own query form, merged the same way (patches/dca.py).

So a step is one to six calls per layer, whatever its mix of rows.
"""

from __future__ import annotations

import torch

from longserve.patches import dca
from longserve.patches.rerope import merge_attention
from longserve.server.engine.native.attention_backend import UNBOUNDED, GatherBackend, RowBand, Scratch
from longserve.server.engine.native.kv_cache import KvPool, write_keys_and_values
from longserve.server.engine.native.positions import Encoding
from longserve.server.engine.native.step_inputs import StepInputs


class StepAttention:
    def __init__(self, pool: KvPool, step: StepInputs, encoding: Encoding, backend: GatherBackend):
        self.pool, self.step, self.encoding, self.backend = pool, step, encoding, backend
        self.scratch = Scratch()  # every layer gathers the same amounts: one set of buffers for the step
        settings = [row.seq.positions for row in step.rows]
        plain = [RowBand(index, 0, UNBOUNDED) for index, row in enumerate(settings) if row.window is None and row.chunk is None]
        clipped = [index for index, row in enumerate(settings) if row.window is not None]
        chunked = [index for index, row in enumerate(settings) if row.chunk is not None]
        self.plain = backend.plan(step, plain, need_lse=False) if plain else None
        self.near = self.far = self.chunk_calls = None
        if clipped:
            if not pool.with_near_keys:
                raise RuntimeError("a clipped row reached the forward pass before its near-key plane was made")
            self.near = backend.plan(step, [RowBand(index, 0, settings[index].window) for index in clipped], need_lse=True)
            self.far = backend.plan(step, [RowBand(index, settings[index].window, UNBOUNDED) for index in clipped],
                                    need_lse=True)
            every = self.near.tokens is None
            self.near_slots = step.slot_mapping if every else step.slot_mapping[self.near.tokens]
        if chunked:  # patches/dca.py: the same chunk, the chunk before, earlier chunks
            self.chunk_calls = [backend.plan(step, [RowBand(index, lo, hi, settings[index].chunk_len) for index in chunked],
                                             need_lse=True)
                                for lo, hi in ((dca.SAME, dca.PREVIOUS), (dca.PREVIOUS, dca.EARLIER), (dca.EARLIER, UNBOUNDED))]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        encoding, pool, slots = self.encoding, self.pool, self.step.slot_mapping
        keys, values = pool.keys[layer], pool.values[layer]
        write_keys_and_values(keys, values, slots, encoding.rotate_key(k), v)
        parts = []  # (the call's tokens, their output), one per kind of row
        query = encoding.rotate_query(q) if self.plain is not None or self.near is not None else None  # R_i, once
        if self.plain is not None:
            parts.append((self.plain.tokens, self.backend.attend(self.plain, query, keys, values, self.scratch)[0]))
        if self.near is not None:
            near_keys = encoding.rotate_near_key(k if self.near.tokens is None else k[self.near.tokens], self.near.tokens)
            pool.near_keys[layer].write(self.near_slots, near_keys)
            parts.append((self.near.tokens, merge_attention([
                self.backend.attend(self.near, query, pool.near_keys[layer], values, self.scratch),
                self.backend.attend(self.far, encoding.rotate_far_query(q), keys, values, self.scratch),
            ])))
        if self.chunk_calls is not None:
            queries = encoding.rotate_chunk_queries(q)
            parts.append((self.chunk_calls[0].tokens, merge_attention([
                self.backend.attend(plan, query, keys, values, self.scratch) for plan, query in zip(self.chunk_calls, queries)])))
        if len(parts) == 1:
            return parts[0][1]
        out = q.new_empty(q.shape)
        for tokens, part in parts:
            out.index_copy_(0, tokens, part)
        return out
