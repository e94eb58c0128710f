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

Attention is then two calls over the same values: the near keys for
distances [0, w) and the far keys for [w, inf), each returning the
log-sum-exp of its scores, merged exactly (merge_attention, the way flash
attention merges its tiles). The engine's attention backend runs both calls
for every clipped row of a step at once (server/engine/native/attention.py).
"""

from __future__ import annotations

import torch


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


def flash_cpu(q, k, v, additive_mask: torch.Tensor | None, scale: float, causal: bool = False):
    # Public SDPA does not return the log-sum-exp that merging needs; this is
    # the kernel SDPA itself runs on CPU, and returns it (torch is pinned).
    # It takes grouped-query heads as they are (q's heads a multiple of k's).
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=additive_mask,
                                                                          scale=scale)
    return out, lse.float()


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over the union of disjoint key sets, from each set's (output, log-sum-exp)."""
    if len(parts) == 1:
        return parts[0][0]
    total = torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)
    merged = sum(torch.exp(lse - total).unsqueeze(-1) * out.float() for out, lse in parts)
    return merged.to(parts[0][0].dtype)
