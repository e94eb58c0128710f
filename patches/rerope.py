"""ReRoPE and Leaky ReRoPE: attention over clipped relative positions, pure functions of tensors.

Query i and key j are r = i - j apart. ReRoPE lets attention see min(r, w);
Leaky ReRoPE sees r inside the window and w + (r - w) * leak past it
(leak = 1/k; leak = 0 is ReRoPE). Every score takes one of two forms:

- near (r < w): the usual rotary score (R_i q) . (R_j k);
- far (r >= w): (R_{p(i)} q) . (R_{j*leak} k) with p(i) = i*leak + w*(1 - leak),
  whose angle difference is exactly the clipped distance.

The far key R_{j*leak} k depends on j alone, so that is what the cache keeps:
for ReRoPE it is the key before rotation. A near key is a cached key turned
on by j*(1 - leak); only keys inside some query's window need it.

Prefill of queries [s, e) splits the keys [0, e) into three ranges: [0, a)
is far for every query (a = s - w + 1), [b, e) is near for every query
(b = e - w), and the band [a, b) between them is decided per (i, j). Each
range and form is one fused attention call that also returns the
log-sum-exp of its scores; the parts then merge exactly, the way flash
attention merges its tiles. Only the band (as wide as the chunk) is scored
in both forms, and memory grows as chunk x length, never length².
Decode (one query per row) scores every key in the far form and the window
in the near form, then keeps the right one per key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patches.rope import cos_sin, rotate

EXPLICIT_QUERY_ROWS = 256  # query rows per block on the explicit path: bounds its score memory


def clipped_distance(distance: torch.Tensor, window: int, leak: float) -> torch.Tensor:
    """The distance attention sees: r inside the window, w + (r - w) * leak past it."""
    return torch.where(distance < window, distance.float(), window + (distance - window) * leak)


def far_query_positions(positions: torch.Tensor, window, leak) -> torch.Tensor:
    """p(i) = i*leak + w*(1 - leak): where a query stands for its far scores."""
    return positions * leak + window * (1.0 - leak)


def far_key_positions(positions: torch.Tensor, leak) -> torch.Tensor:
    """j*leak: where a cached key stands (0 for ReRoPE: the key before rotation)."""
    return positions * leak


def turn(keys: torch.Tensor, inv_freq: torch.Tensor, angles_at: torch.Tensor) -> torch.Tensor:
    """Rotate keys [..., n, d] by the positions angles_at [n] (or [rows, n] for keys [rows, h, n, d])."""
    cos, sin = cos_sin(inv_freq, angles_at)
    if angles_at.dim() == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return rotate(keys, cos.to(keys.dtype), sin.to(keys.dtype))


@dataclass
class KeyMask:
    """Which keys each query may see, prepared once and reused by every layer.

    Rows are folded for grouped-query attention: the `groups` query heads that
    share a KV head go along the query axis, so the keys are never copied.
    """

    allowed: torch.Tensor  # bool [groups * Lq, Lk]
    additive: torch.Tensor  # 0 where allowed, -inf elsewhere, in the compute dtype
    empty: torch.Tensor  # bool [groups * Lq]: rows that see no key at all

    @classmethod
    def build(cls, allowed: torch.Tensor, groups: int, dtype: torch.dtype) -> "KeyMask":
        folded = allowed.repeat(groups, 1)
        additive = torch.zeros(folded.shape, dtype=dtype, device=folded.device).masked_fill_(~folded, float("-inf"))
        return cls(folded, additive, ~folded.any(-1))


def attention_lse(q, k, v, mask: KeyMask | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v over the keys `mask` allows (all when None), and the
    log-sum-exp of those scores.

    q [B, H, Lq, d]; k, v [B, KV, Lk, d] with H a multiple of KV (grouped-query
    attention). A query with nothing to look at gets output 0 and log-sum-exp -inf.
    """
    batch, heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    folded = q.reshape(batch, kv_heads, heads // kv_heads * rows, dim)
    if q.device.type == "cpu":
        out, lse = flash_cpu(folded, k, v, None if mask is None else mask.additive, scale)
    else:
        out, lse = explicit(folded, k, v, None if mask is None else mask.allowed, scale)
    if mask is not None:
        lse = lse.masked_fill(mask.empty, float("-inf"))
    return out.reshape(batch, heads, rows, v.shape[-1]), lse.reshape(batch, heads, rows)


def flash_cpu(q, k, v, additive_mask: torch.Tensor | None, scale: float):
    # Public SDPA does not return the log-sum-exp that merging needs; this is
    # the kernel SDPA itself runs on CPU, and returns it (torch is pinned).
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=additive_mask, scale=scale)
    return out, lse.float()


def explicit(q, k, v, allowed: torch.Tensor | None, scale: float):
    """The same computation with materialized scores, a block of query rows at a time."""
    outs, lses = [], []
    for first in range(0, q.shape[2], EXPLICIT_QUERY_ROWS):
        block = slice(first, first + EXPLICIT_QUERY_ROWS)
        scores = (q[:, :, block] @ k.transpose(-1, -2)).float() * scale
        if allowed is not None:
            scores = scores.masked_fill(~allowed[block], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        weights = torch.exp(scores - lse).nan_to_num(0.0)  # rows with no keys: -inf - -inf
        outs.append((weights.to(v.dtype) @ v))
        lses.append(lse.squeeze(-1))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over the union of disjoint key sets, from each set's (output, log-sum-exp)."""
    if len(parts) == 1:
        return parts[0][0]
    total = torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)
    merged = sum(torch.exp(lse - total).unsqueeze(-1) * out.float() for out, lse in parts)
    return merged.to(parts[0][0].dtype)


@dataclass
class PrefillPlan:
    """The key ranges, masks and turning angles of one prefill chunk: the same for every layer."""

    far_end: int  # keys [0, far_end): far for every query
    band_end: int  # keys [far_end, band_end): far where i - j >= w (band_mask)
    end: int  # keys [far_end, end): near where 0 <= i - j < w (near_mask)
    band_mask: KeyMask | None
    near_mask: KeyMask
    near_cos: torch.Tensor  # turns cached keys [far_end, end) on to their near form
    near_sin: torch.Tensor


def plan_prefill(start: int, end: int, window: int, leak: float, inv_freq: torch.Tensor, groups: int,
                 dtype: torch.dtype) -> PrefillPlan:
    """Queries at positions [start, end) of one sequence, over its keys [0, end)."""
    device = inv_freq.device
    far_end = max(0, start - window + 1)
    band_end = max(far_end, end - window)
    queries_at = torch.arange(start, end, device=device).unsqueeze(1)
    band_mask = None
    if band_end > far_end:
        band_mask = KeyMask.build(queries_at - torch.arange(far_end, band_end, device=device) >= window, groups, dtype)
    keys_at = torch.arange(far_end, end, device=device)
    distance = queries_at - keys_at
    near_mask = KeyMask.build((distance >= 0) & (distance < window), groups, dtype)
    cos, sin = cos_sin(inv_freq, keys_at * (1.0 - leak))
    return PrefillPlan(far_end, band_end, end, band_mask, near_mask, cos.to(dtype), sin.to(dtype))


def clipped_prefill_attention(q_near, q_far, keys, values, plan: PrefillPlan, scale: float) -> torch.Tensor:
    """One prefill chunk: q_near, q_far [1, H, Lq, d] are the queries turned for the near and
    far forms (log-n applied); keys, values [1, KV, >= plan.end, d] the cache in the far form."""
    far_end, band_end, end = plan.far_end, plan.band_end, plan.end
    parts = []
    if far_end > 0:
        parts.append(attention_lse(q_far, keys[:, :, :far_end], values[:, :, :far_end], None, scale))
    if plan.band_mask is not None:
        parts.append(attention_lse(q_far, keys[:, :, far_end:band_end], values[:, :, far_end:band_end], plan.band_mask, scale))
    near_keys = rotate(keys[:, :, far_end:end], plan.near_cos, plan.near_sin)
    parts.append(attention_lse(q_near, near_keys, values[:, :, far_end:end], plan.near_mask, scale))
    return merge_attention(parts)


def clipped_decode_attention(
    q_near, q_far, keys, values, lengths: torch.Tensor, window: torch.Tensor, leak: torch.Tensor,
    inv_freq: torch.Tensor, scale: float,
) -> torch.Tensor:
    """One query per row, at position lengths[r], over that row's keys [0, lengths[r]].

    q_near, q_far [R, H, 1, d]; keys, values [R, KV, span, d] in the far form;
    window (int) and leak (float) are per row, [R]. Returns [R, H, 1, d].
    """
    rows, heads, _, dim = q_near.shape
    kv_heads, span = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    far_scores = q_far.reshape(rows, kv_heads, groups, dim) @ keys.transpose(-1, -2)  # [R, KV, g, span]
    # The near form only for the last `window` keys of each row, gathered.
    width = min(int(window.max()), span)
    first = (lengths - window + 1).clamp(min=0, max=span - width)
    keys_at = first.unsqueeze(1) + torch.arange(width, device=keys.device)  # [R, width]
    gathered = keys.gather(2, keys_at[:, None, :, None].expand(rows, kv_heads, width, dim))
    near_keys = turn(gathered, inv_freq, keys_at * (1.0 - leak).unsqueeze(1))
    near_scores = q_near.reshape(rows, kv_heads, groups, dim) @ near_keys.transpose(-1, -2)  # [R, KV, g, width]
    is_near = (lengths.unsqueeze(1) - keys_at < window.unsqueeze(1))[:, None, None, :]
    at = keys_at[:, None, None, :].expand(rows, kv_heads, groups, width)
    scores = far_scores.scatter(-1, at, torch.where(is_near, near_scores, far_scores.gather(-1, at))).float() * scale
    visible = torch.arange(span, device=keys.device).unsqueeze(0) <= lengths.unsqueeze(1)
    weights = scores.masked_fill(~visible[:, None, None, :], float("-inf")).softmax(-1)
    return (weights.to(values.dtype) @ values).reshape(rows, heads, 1, values.shape[-1])
