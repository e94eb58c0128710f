"""The attention step: where positions meet the cache.

Each forward pass builds one of these with its Encoding; the model runner
calls it once per layer with the raw q, k, v of that layer. It turns q and k
(positions.py), writes the keys and values into the cache, and attends:
plain rows with PyTorch's SDPA over keys cached after rotation, clipped rows
(rerope, leaky-rerope) with patches/rerope.py over keys cached in the far form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patches.rerope import clipped_decode_attention, clipped_prefill_attention, plan_prefill
from server.engine.native.kv_cache import SlotCache
from server.engine.native.positions import Encoding


class PrefillAttention:
    """Positions [start, end) of the sequence in cache row `slot`, attending to all of [0, end)."""

    def __init__(self, cache: SlotCache, slot: int, start: int, end: int, encoding: Encoding, groups: int, scale: float):
        self.cache, self.slot, self.start, self.end = cache, slot, start, end
        self.encoding, self.scale = encoding, scale
        self.mask = self.plan = None
        clipping = encoding.clipping
        if clipping is not None:
            cache.ensure_near_keys()
            self.plan = plan_prefill(start, end, int(clipping.window[0]), groups, cache.dtype, cache.device)
        elif start > 0:  # queries [start, end) see keys [0, end), causally
            device = cache.device
            self.mask = torch.arange(end, device=device).unsqueeze(0) <= torch.arange(start, end, device=device).unsqueeze(1)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        encoding, slot, start, end = self.encoding, self.slot, self.start, self.end
        cache = self.cache
        cache.keys[layer][slot, :, start:end] = encoding.rotate_key(k)[0]
        cache.values[layer][slot, :, start:end] = v[0]
        keys = cache.keys[layer][slot : slot + 1, :, :end]
        values = cache.values[layer][slot : slot + 1, :, :end]
        if self.plan is None:
            return F.scaled_dot_product_attention(
                encoding.rotate_query(q), keys, values,
                attn_mask=self.mask, is_causal=self.mask is None, scale=self.scale, enable_gqa=True,
            )
        cache.near_keys[layer][slot, :, start:end] = encoding.rotate_near_key(k)[0]
        near_keys = cache.near_keys[layer][slot : slot + 1, :, :end]
        return clipped_prefill_attention(
            encoding.rotate_query(q), encoding.rotate_far_query(q), keys, near_keys, values, self.plan, self.scale
        )


class DecodeAttention:
    """One new token for every cache row in use; `slots` are the rows of running sequences.

    Other rows (free, or mid-prefill) ride along as dummies: their output is
    dropped and they never write to the cache.
    """

    def __init__(self, cache: SlotCache, slots: torch.Tensor, lengths: torch.Tensor, encoding: Encoding,
                 num_heads: int, scale: float):
        self.cache, self.slots, self.lengths, self.encoding = cache, slots, lengths, encoding
        self.num_heads, self.scale = num_heads, scale
        self.rows = lengths.shape[0]
        self.span = int(lengths.max()) + 1
        mask = torch.arange(self.span, device=cache.device).unsqueeze(0) <= lengths.unsqueeze(1)
        self.mask = None if bool(mask.all()) else mask[:, None, None, :]  # [rows, 1, 1, span]
        self.write_at = lengths[slots]
        clipping = encoding.clipping
        self.clipped_rows = None if clipping is None else clipping.rows[:, None, None, None]
        if clipping is not None:
            cache.ensure_near_keys()
        self.any_plain = clipping is None or not bool(clipping.rows[slots].all())

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        slots, encoding, cache = self.slots, self.encoding, self.cache
        cache.keys[layer][slots, :, self.write_at] = encoding.rotate_key(k)[slots, :, 0]
        cache.values[layer][slots, :, self.write_at] = v[slots, :, 0]
        if cache.with_near_keys:
            cache.near_keys[layer][slots, :, self.write_at] = encoding.rotate_near_key(k)[slots, :, 0]
        keys = self.cache.keys[layer][: self.rows, :, : self.span]
        values = self.cache.values[layer][: self.rows, :, : self.span]
        query = encoding.rotate_query(q)
        out = self.plain(query, keys, values) if self.any_plain else None
        clipping = encoding.clipping
        if clipping is None:
            return out
        near_keys = cache.near_keys[layer][: self.rows, :, : self.span]
        clipped = clipped_decode_attention(
            query, encoding.rotate_far_query(q), keys, near_keys, values, self.lengths, clipping.window, self.scale
        )
        return clipped if out is None else torch.where(self.clipped_rows, clipped, out)

    def plain(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # One query token per row: fold the query heads that share a KV head
        # into the query-length axis, so plain SDPA serves grouped-query attention.
        kv_heads, head_dim = keys.shape[1], keys.shape[-1]
        grouped = query.reshape(self.rows, kv_heads, self.num_heads // kv_heads, head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=self.mask, scale=self.scale)
        return out.reshape(self.rows, self.num_heads, 1, head_dim)
