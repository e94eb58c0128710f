"""ReRoPE, Leaky ReRoPE and Self-Extend: attention over clipped relative positions, pure functions of tensors.

Query i and key j are r = i - j apart. ReRoPE lets attention see min(r, w);
Leaky ReRoPE sees r inside the window and w + (r - w) * leak past it
(leak = 1/k; leak = 0 is ReRoPE). Self-Extend (LongLM) sees r inside the
window and floor(i/G) - floor(j/G) + w - floor(w/G) past it: positions
grouped by floor division. Every score takes one of two forms:

- near (r < w): the usual rotary score (R_i q) . (R_j k);
- far (r >= w): (R_{p(i)} q) . (R_{f(j)} k) with f(j) = j*leak and
  p(i) = i*leak + w*(1 - leak), whose angle difference is exactly the
  clipped distance; for Self-Extend f(j) = floor(j/G) and
  p(i) = floor(i/G) + w - floor(w/G).

Both key forms depend on j alone, so the cache keeps both: the far key
R_{j*leak} k (for ReRoPE the key before rotation) and the near key R_j k.
No step has to turn a cached key again.

Prefill of queries [s, e) splits the keys [0, e) into three ranges: [0, a)
is far for every query (a = s - w + 1), [b, e) is near for every query
(b = e - w), and the band [a, b) between them is decided per (i, j). Each
range and form is one fused attention call that also returns the
log-sum-exp of its scores; the parts then merge exactly, the way flash
attention merges its tiles. Only the band (as wide as the chunk) is scored
in both forms, and memory grows as chunk x length, never length².
Decode (one query per row) is the same split with a mask per row: keys at
distance >= w in the far form, the last w keys in the near form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


EXPLICIT_QUERY_ROWS = 256  # query rows per block on the explicit path: bounds its score memory


def far_query_positions(positions: torch.Tensor, window, leak, group=None) -> torch.Tensor:
    """p(i) = i*leak + w*(1 - leak): where a query stands for its far scores; where `group` (G, per row; 0:
    none) is set, Self-Extend's floor(i/G) + w - floor(w/G), in integers (i * (1/G) may round below i/G)."""
    far = positions * leak + window * (1.0 - leak)
    if group is None:
        return far
    size = group.clamp(min=1)
    grouped = torch.div(positions, size, rounding_mode="floor") + window - torch.div(window, size, rounding_mode="floor")
    return torch.where(group > 0, grouped.to(far.dtype), far)


def far_key_positions(positions: torch.Tensor, leak, group=None) -> torch.Tensor:
    """j*leak: where a cached key stands (0 for ReRoPE: the key before rotation); Self-Extend's floor(j/G)."""
    far = positions * leak
    if group is None:
        return far
    grouped = torch.div(positions, group.clamp(min=1), rounding_mode="floor")
    return torch.where(group > 0, grouped.to(far.dtype), far)


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
    if fused_kernel_for(q.device):
        out, lse = flash_cpu(folded, k, v, None if mask is None else mask.additive, scale)
    else:
        out, lse = explicit(folded, k, v, None if mask is None else mask.allowed, scale)
    if mask is not None:
        lse = lse.masked_fill(mask.empty, float("-inf"))
    return out.reshape(batch, heads, rows, v.shape[-1]), lse.reshape(batch, heads, rows)


def fused_kernel_for(device: torch.device) -> bool:
    """Whether the fused kernel with log-sum-exp serves this device; elsewhere the explicit path does."""
    return device.type == "cpu"


def flash_cpu(q, k, v, additive_mask: torch.Tensor | None, scale: float, causal: bool = False):
    # Public SDPA does not return the log-sum-exp that merging needs; this is
    # the kernel SDPA itself runs on CPU, and returns it (torch is pinned).
    # It takes grouped-query heads as they are (q's heads a multiple of k's).
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=additive_mask,
                                                                          scale=scale)
    return out, lse.float()


def explicit(q, k, v, allowed: torch.Tensor | None, scale: float):
    """The same computation with materialized scores, a block of query rows at a time.

    `allowed` broadcasts to the scores [B, KV, Lq, Lk]: [Lq, Lk], or [B, 1, 1, Lk] for one mask per batch row.
    """
    outs, lses = [], []
    for first in range(0, q.shape[2], EXPLICIT_QUERY_ROWS):
        block = slice(first, first + EXPLICIT_QUERY_ROWS)
        scores = (q[:, :, block] @ k.transpose(-1, -2)).float() * scale
        if allowed is not None:
            scores = scores.masked_fill(~(allowed if allowed.shape[-2] == 1 else allowed[..., block, :]), float("-inf"))
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


def plan_prefill(start: int, end: int, window: int, groups: int, dtype: torch.dtype, device: torch.device) -> PrefillPlan:
    """Queries at positions [start, end) of one sequence, over its keys [0, end)."""
    far_end = max(0, start - window + 1)
    band_end = max(far_end, end - window)
    queries_at = torch.arange(start, end, device=device).unsqueeze(1)
    band_mask = None
    if band_end > far_end:
        band_mask = KeyMask.build(queries_at - torch.arange(far_end, band_end, device=device) >= window, groups, dtype)
    keys_at = torch.arange(far_end, end, device=device)
    distance = queries_at - keys_at
    near_mask = KeyMask.build((distance >= 0) & (distance < window), groups, dtype)
    return PrefillPlan(far_end, band_end, end, band_mask, near_mask)


def clipped_prefill_attention(q_near, q_far, far_keys, near_keys, values, plan: PrefillPlan, scale: float) -> torch.Tensor:
    """One prefill chunk: q_near, q_far [1, H, Lq, d] are the queries turned for the near and far
    forms (log-n applied); far_keys, near_keys, values [1, KV, >= plan.end, d] the cache planes."""
    far_end, band_end, end = plan.far_end, plan.band_end, plan.end
    parts = []
    if far_end > 0:
        parts.append(attention_lse(q_far, far_keys[:, :, :far_end], values[:, :, :far_end], None, scale))
    if plan.band_mask is not None:
        band = slice(far_end, band_end)
        parts.append(attention_lse(q_far, far_keys[:, :, band], values[:, :, band], plan.band_mask, scale))
    parts.append(attention_lse(q_near, near_keys[:, :, far_end:end], values[:, :, far_end:end], plan.near_mask, scale))
    return merge_attention(parts)


def clipped_decode_attention(
    q_near, q_far, far_keys, near_keys, values, lengths: torch.Tensor, window: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per row, at position lengths[r], over that row's keys [0, lengths[r]].

    q_near, q_far [R, H, 1, d]; far_keys, near_keys, values [R, KV, span, d]:
    the cache planes; window [R] per row (>= 1). The far part is one fused
    call with a mask per row; the near part reads each row's own window slice,
    so rows of any lengths cost what their windows hold. Returns [R, H, 1, d].
    """
    far_limit = lengths - window  # row r looks at keys [0, far_limit[r]] in the far form
    far_span = max(0, int(far_limit.max()) + 1)
    parts = []
    if far_span > 0:
        at = torch.arange(far_span, device=values.device)
        far_allowed = at.unsqueeze(0) <= far_limit.unsqueeze(1)
        parts.append(attention_per_row(q_far, far_keys[:, :, :far_span], values[:, :, :far_span], far_allowed, scale))
    outs, lses = [], []
    for row, (length, first) in enumerate(zip(lengths.tolist(), (far_limit + 1).clamp(min=0).tolist())):
        every = torch.ones(1, length + 1 - first, dtype=torch.bool, device=values.device)
        window_slice = slice(first, length + 1)
        out, lse = attention_per_row(q_near[row : row + 1], near_keys[row : row + 1, :, window_slice],
                                     values[row : row + 1, :, window_slice], every, scale)
        outs.append(out)
        lses.append(lse)
    parts.append((torch.cat(outs), torch.cat(lses)))
    return merge_attention(parts)


def attention_per_row(q, k, v, allowed: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_lse for one query per row with a key mask per row: allowed bool [R, Lk]."""
    rows, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    folded = q.reshape(rows, kv_heads, heads // kv_heads, dim)  # one query per row: groups along the query axis
    if fused_kernel_for(q.device):
        additive = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
        out, lse = flash_cpu(folded, k, v, additive[:, None, None, :], scale)
    else:
        out, lse = explicit(folded, k, v, allowed[:, None, None, :], scale)
    lse = lse.masked_fill(~allowed.any(-1)[:, None, None], float("-inf"))
    return out.reshape(rows, heads, 1, v.shape[-1]), lse.reshape(rows, heads, 1)
