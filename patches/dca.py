"""Dual Chunk Attention (DCA; An et al. 2024, "Training-Free Long-Context Scaling of Large Language Models",
ChunkLlama; the method Qwen2.5-*-1M ship with): pure functions of positions.

The sequence is cut into chunks of cl = chunk_size - local_size tokens. A key
stands at its position inside its chunk, f(j) = j mod cl, and is rotated by
it once. A query is scored against the keys in three ways, by how many chunks
back the key sits (c = floor(i / cl) - floor(j / cl)):

- c = 0, the same chunk: the query stands at i mod cl, so the distance is
  i - j, exact;
- c = 1, the chunk before: at min(i mod cl + cl, chunk_size), exact while
  i mod cl <= local_size, then held at chunk_size;
- c >= 2, earlier chunks: at min(2 cl - 1, chunk_size), one place for every
  query.

No query stands past chunk_size and no key past cl - 1, so no distance
exceeds chunk_size, which must lie within the trained length. These are the
position indices of vLLM's V0 DualChunkRotaryEmbedding (its q, qc and
qc[chunk_len - 1] tables over keys at pos % chunk_len; tests/test_dca.py
checks a small case by its numbers). Attention is then three calls over one
key plane, each masked to its chunks and merged exactly by log-sum-exp (as
patches/rerope.py's two); the engine runs them for every DCA row of a step at
once (server/engine/native/attention.py).
"""

from __future__ import annotations

import torch

SAME, PREVIOUS, EARLIER = 0, 1, 2  # chunk distances: [SAME, PREVIOUS), [PREVIOUS, EARLIER), [EARLIER, inf)


def chunk_len(chunk_size: int, local_size: int) -> int:
    return chunk_size - local_size


def key_positions(positions: torch.Tensor, length) -> torch.Tensor:
    """f(j) = j mod cl: where a cached key stands (`length` is cl, per token or one for all)."""
    return torch.remainder(positions, length)


def query_positions(positions: torch.Tensor, length, chunk_size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where query i stands for keys in its own chunk, the chunk before, and earlier chunks."""
    inside = torch.remainder(positions, length)
    previous = torch.minimum(inside + length, torch.as_tensor(chunk_size, dtype=inside.dtype, device=inside.device))
    earlier = torch.minimum(torch.as_tensor(2 * length - 1, dtype=inside.dtype, device=inside.device),
                            torch.as_tensor(chunk_size, dtype=inside.dtype, device=inside.device)).expand_as(inside)
    return inside, previous, earlier


def relative_positions(length: int, chunk_size: int, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The distance DCA gives query i and key j (i >= j), for every pair: a naive full matrix [queries, keys],
    for references and tests."""
    chunks_back = torch.div(queries[:, None], length, rounding_mode="floor") - torch.div(keys[None, :], length, rounding_mode="floor")
    same, previous, earlier = query_positions(queries, length, chunk_size)
    query_at = torch.where(chunks_back == SAME, same[:, None], torch.where(chunks_back == PREVIOUS, previous[:, None],
                                                                           earlier[:, None]))
    return query_at - key_positions(keys, length)[None, :]
