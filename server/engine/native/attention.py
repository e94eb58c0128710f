"""The attention step: where positions meet the cache, once per layer for the whole step.

Built once per step from its inputs (step_inputs.py) and its Encoding
(positions.py); the model runner calls it once per layer with the step's flat
q [tokens, heads, d], k and v [tokens, kv_heads, d]. It turns q and k, writes
every token's key and value into its slot in one index_copy per plane
(planes are [kv_heads, slots, d], kv_cache.py), and
runs the backend's calls (attention_backend.py):

- plain and scaled-RoPE rows: one call over the keys cached after rotation,
  distances [0, inf);
- rows on ReRoPE, Leaky ReRoPE or Self-Extend: two calls, the near plane for
  distances [0, w) and the far plane for [w, inf), merged exactly by their
  log-sum-exps (patches/rerope.py's merge). Rows with different windows,
  leaks and groups share both calls.

So a step is one, or three, calls per layer, whatever its mix of rows.
"""

from __future__ import annotations

import torch

from longserve.patches.rerope import merge_attention
from longserve.server.engine.native.attention_backend import UNBOUNDED, GatherBackend, RowBand
from longserve.server.engine.native.kv_cache import KvPool
from longserve.server.engine.native.positions import Encoding
from longserve.server.engine.native.step_inputs import StepInputs


class StepAttention:
    def __init__(self, pool: KvPool, step: StepInputs, encoding: Encoding, backend: GatherBackend):
        self.pool, self.step, self.encoding, self.backend = pool, step, encoding, backend
        windows = [row.seq.positions.window for row in step.rows]
        plain = [RowBand(index, 0, UNBOUNDED) for index, window in enumerate(windows) if window is None]
        clipped = [index for index, window in enumerate(windows) if window is not None]
        self.plain = backend.plan(step, plain, need_lse=False) if plain else None
        self.near = self.far = None
        if clipped:
            if not pool.with_near_keys:
                raise RuntimeError("a clipped row reached the forward pass before its near-key plane was made")
            self.near = backend.plan(step, [RowBand(index, 0, windows[index]) for index in clipped], need_lse=True)
            self.far = backend.plan(step, [RowBand(index, windows[index], UNBOUNDED) for index in clipped], need_lse=True)
            every = self.near.tokens is None
            self.near_slots = step.slot_mapping if every else step.slot_mapping[self.near.tokens]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        encoding, pool, slots = self.encoding, self.pool, self.step.slot_mapping
        pool.keys[layer].index_copy_(1, slots, encoding.rotate_key(k).transpose(0, 1))
        pool.values[layer].index_copy_(1, slots, v.transpose(0, 1))
        query = encoding.rotate_query(q)
        plain = None if self.plain is None else self.backend.attend(self.plain, query, pool.keys[layer], pool.values[layer])[0]
        if self.near is None:
            return plain
        near_keys = encoding.rotate_near_key(k if self.near.tokens is None else k[self.near.tokens], self.near.tokens)
        pool.near_keys[layer].index_copy_(1, self.near_slots, near_keys.transpose(0, 1))
        clipped = merge_attention([
            self.backend.attend(self.near, query, pool.near_keys[layer], pool.values[layer]),
            self.backend.attend(self.far, encoding.rotate_far_query(q), pool.keys[layer], pool.values[layer]),
        ])
        if plain is None:
            return clipped
        out = torch.empty_like(query)
        out.index_copy_(0, self.plain.tokens, plain)
        out.index_copy_(0, self.near.tokens, clipped)
        return out
