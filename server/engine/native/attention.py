"""The attention step: where positions meet the cache.

Each forward pass builds one of these per segment (the decode rows, each
prefill chunk) with its Encoding; the model runner calls it once per layer
with that segment's raw q, k, v. It turns q and k (positions.py), writes the
keys and values into the sequence's blocks, gathers the blocks it attends to,
and attends: plain rows with PyTorch's SDPA over keys cached after rotation,
clipped rows (rerope, leaky-rerope) with patches/rerope.py over keys cached in
the far form, whose log-sum-exp merge is exact whatever the gather.

Why attention over gathered blocks (measured on this 2-core CPU, bf16, a
decode batch of 32 rows x 256 positions, 3 KV heads of 64; /tmp-free numbers
in the issue-16 note): gathering one plane with index_select takes 91 us
(plane[index] took 1141 us), and attention over the gathered copy costs what
it costs over a slice of a dense cache (690 vs 735 us with SDPA). Two bf16
matmuls with a float32 softmax take 267 us there, so bf16 decode on CPU uses
them; float32 and CUDA keep SDPA. A long prompt's blocks are mostly
consecutive, and then the "gather" is a slice: no copy at all. Not measured:
FlexAttention (it needs torch.compile to be fast) and vLLM's paged-attention
ops (CUDA, or vLLM's own CPU cache layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patches.rerope import clipped_decode_attention, clipped_prefill_attention, plan_prefill
from server.engine.native.kv_cache import BLOCK_SIZE, KvPool, slot_index, write_slots
from server.engine.native.positions import Encoding


def store(plane: torch.Tensor, where, x: torch.Tensor) -> None:
    """x [tokens, kv_heads, head_dim] into the pool slots `where` (a slice or an index tensor)."""
    if isinstance(where, slice):
        plane[where] = x
    else:
        plane.index_copy_(0, where, x)


def read(plane: torch.Tensor, where) -> torch.Tensor:
    """The pool slots `where`: a view for a slice, else a gather."""
    return plane[where] if isinstance(where, slice) else plane.index_select(0, where)


class PrefillAttention:
    """Positions [start, end) of one sequence, attending to all of [0, end)."""

    def __init__(self, pool: KvPool, block_table: list[int], start: int, end: int, encoding: Encoding, groups: int,
                 scale: float):
        self.pool, self.encoding, self.scale = pool, encoding, scale
        device = pool.device
        self.read = slot_index(block_table, end, device)
        self.write = write_slots(block_table, start, end, device)
        self.mask = self.plan = None
        clipping = encoding.clipping
        if clipping is not None:
            pool.ensure_near_keys()
            self.plan = plan_prefill(start, end, int(clipping.window[0]), groups, pool.dtype, device)
        elif start > 0:  # queries [start, end) see keys [0, end), causally
            self.mask = torch.arange(end, device=device).unsqueeze(0) <= torch.arange(start, end, device=device).unsqueeze(1)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        encoding, pool = self.encoding, self.pool
        store(pool.keys[layer], self.write, encoding.rotate_key(k)[0].transpose(0, 1))
        store(pool.values[layer], self.write, v[0].transpose(0, 1))
        keys = read(pool.keys[layer], self.read).transpose(0, 1).unsqueeze(0)
        values = read(pool.values[layer], self.read).transpose(0, 1).unsqueeze(0)
        if self.plan is None:
            return F.scaled_dot_product_attention(
                encoding.rotate_query(q), keys, values,
                attn_mask=self.mask, is_causal=self.mask is None, scale=self.scale, enable_gqa=True,
            )
        store(pool.near_keys[layer], self.write, encoding.rotate_near_key(k)[0].transpose(0, 1))
        near_keys = read(pool.near_keys[layer], self.read).transpose(0, 1).unsqueeze(0)
        return clipped_prefill_attention(
            encoding.rotate_query(q), encoding.rotate_far_query(q), keys, near_keys, values, self.plan, self.scale
        )


class DecodeAttention:
    """One new token for each row; row r writes position lengths[r] and attends to [0, lengths[r]]."""

    def __init__(self, pool: KvPool, block_tables: list[list[int]], lengths: torch.Tensor, encoding: Encoding,
                 num_heads: int, scale: float):
        self.pool, self.lengths, self.encoding = pool, lengths, encoding
        self.num_heads, self.scale = num_heads, scale
        device = pool.device
        self.rows = len(block_tables)
        self.span = int(lengths.max()) + 1
        if self.rows == 1:  # one row: a slice when its blocks are consecutive
            self.read = slot_index(block_tables[0], self.span, device)
            self.write = write_slots(block_tables[0], self.span - 1, self.span, device)
            self.mask = None
        else:
            width = -(-self.span // BLOCK_SIZE)
            padded = torch.tensor([table[:width] + [0] * (width - len(table[:width])) for table in block_tables], device=device)
            slots = (padded[:, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=device)).flatten(1)[:, : self.span]
            self.read = slots  # [rows, span]; past a row's length: masked
            self.write = slots.gather(1, lengths.unsqueeze(1)).squeeze(1)
            mask = torch.arange(self.span, device=device).unsqueeze(0) <= lengths.unsqueeze(1)
            self.mask = None if bool(mask.all()) else mask[:, None, None, :]  # [rows, 1, 1, span]
        clipping = encoding.clipping
        if clipping is not None:
            pool.ensure_near_keys()
        self.clipped_rows = None if clipping is None else clipping.rows[:, None, None, None]
        self.any_plain = clipping is None or not bool(clipping.rows.all())

    def gather(self, plane: torch.Tensor) -> torch.Tensor:
        """The rows' slots as [rows, kv_heads, span, head_dim] (index_select: 10x faster than plane[index] on CPU)."""
        if self.rows == 1:
            return read(plane, self.read).transpose(0, 1).unsqueeze(0)
        return plane.index_select(0, self.read.flatten()).view(self.rows, self.span, *plane.shape[1:]).permute(0, 2, 1, 3)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        encoding, pool = self.encoding, self.pool
        store(pool.keys[layer], self.write, encoding.rotate_key(k)[:, :, 0])
        store(pool.values[layer], self.write, v[:, :, 0])
        if pool.with_near_keys:
            store(pool.near_keys[layer], self.write, encoding.rotate_near_key(k)[:, :, 0])
        keys, values = self.gather(pool.keys[layer]), self.gather(pool.values[layer])
        query = encoding.rotate_query(q)
        out = self.plain(query, keys, values) if self.any_plain else None
        clipping = encoding.clipping
        if clipping is None:
            return out
        near_keys = self.gather(pool.near_keys[layer])
        clipped = clipped_decode_attention(
            query, encoding.rotate_far_query(q), keys, near_keys, values, self.lengths, clipping.window, self.scale
        )
        return clipped if out is None else torch.where(self.clipped_rows, clipped, out)

    def plain(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # One query token per row: fold the query heads that share a KV head
        # into the query-length axis, so plain SDPA serves grouped-query attention.
        kv_heads, head_dim = keys.shape[1], keys.shape[-1]
        grouped = query.reshape(self.rows, kv_heads, self.num_heads // kv_heads, head_dim)
        if grouped.dtype == torch.bfloat16 and grouped.device.type == "cpu":
            out = self.by_matmul(grouped, keys, values)
        else:
            out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=self.mask, scale=self.scale)
        return out.reshape(self.rows, self.num_heads, 1, head_dim)

    def by_matmul(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Decode attention as two bf16 matmuls and a float32 softmax: 2.5x faster than SDPA's bf16 CPU kernel
        for a few query rows (measured in the issue-16 note), and as accurate."""
        scores = torch.matmul(query, keys.transpose(-1, -2)).float() * self.scale
        if self.mask is not None:
            scores = scores.masked_fill(~self.mask, float("-inf"))
        return torch.matmul(scores.softmax(dim=-1).to(values.dtype), values)
