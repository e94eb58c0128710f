"""Rotary positions per sequence: which table each sequence uses, and how it turns q and k.

Every sequence carries its own setting (patches/rope.py), fixed when it is
created, so one batch can mix requests with different position settings.

What the cache keeps, per sequence:
- plain and scaled RoPE: keys *after* rotation. A table never changes during
  a request (`dynamic` and Phi-3's `longrope` pick theirs from the request's
  whole length), so a cached key stays right for every later step. That makes
  every such type consistent, `dynamic` included: its scale is fixed once per
  request from prompt length + max_tokens (not re-derived as the sequence
  grows, which would leave old keys at an old scale).
- rerope / leaky-rerope: keys in the far form R_{j*leak} k (for ReRoPE the
  key before rotation) and, in a second plane, in the near form R_j k
  (patches/rerope.py); neither ever moves again.
- dca: keys at their place in their chunk, R_{j mod cl} k, in the one key
  plane; queries in three forms, one per chunk distance (patches/dca.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from longserve.patches import dca
from longserve.patches.model_facts import ModelFacts
from longserve.patches.rerope import far_key_positions, far_query_positions
from longserve.patches.rope import PositionSpec, RopeTable, cos_sin, logn_factors, rope_table, rotate
from longserve.server.engine.native import elementwise
from longserve.server.engine.native.loading import to_device

log = logging.getLogger("longserve.engine")


@dataclass
class Rotation:
    cos: torch.Tensor  # [tokens, 1, d]: q and k are [tokens, heads, d]
    sin: torch.Tensor

    def apply(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """x [tokens, heads, d] turned; x holds only the step's tokens `tokens` where given."""
        if tokens is None:
            return elementwise.rotate(x, self.cos, self.sin)
        return rotate(x, self.cos[tokens], self.sin[tokens])


@dataclass
class Clipping:
    """The rows that use ReRoPE or Leaky ReRoPE, and their settings."""

    rows: torch.Tensor  # bool [tokens]: the token's row is clipped
    window: torch.Tensor  # long [tokens]: its row's window (1 for rows that are not clipped)
    far_query: Rotation  # R_{p(i)}: the query for scores past the window


@dataclass
class ChunkQueries:
    """DCA rows' three query forms: for keys in the same chunk, the chunk before, earlier chunks."""

    same: Rotation
    previous: Rotation
    earlier: Rotation


@dataclass
class Encoding:
    """What one forward pass needs to place its tokens."""

    query: Rotation  # R_i
    key: Rotation  # what the cache keeps: R_i, R_{i*leak} for clipped rows, R_{i mod cl} for DCA rows
    query_scale: torch.Tensor | None  # [tokens, 1, 1]; None when no row uses log-n
    clipping: Clipping | None  # None when no row is clipped
    chunks: ChunkQueries | None = None  # None when no row uses DCA

    def scale(self, q: torch.Tensor) -> torch.Tensor:
        return q if self.query_scale is None else q * self.query_scale

    def rotate_query(self, q: torch.Tensor) -> torch.Tensor:
        return self.scale(self.query.apply(q))

    def rotate_far_query(self, q: torch.Tensor) -> torch.Tensor:
        return self.scale(self.clipping.far_query.apply(q))

    def rotate_chunk_queries(self, q: torch.Tensor) -> list[torch.Tensor]:
        """DCA's three query forms, scaled: same chunk, the chunk before, earlier chunks."""
        forms = (self.chunks.same, self.chunks.previous, self.chunks.earlier)
        return [self.scale(form.apply(q)) for form in forms]

    def rotate_key(self, k: torch.Tensor) -> torch.Tensor:
        return self.key.apply(k)

    def rotate_near_key(self, k: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """R_j k: the near form that clipped rows also keep (for the step's tokens `tokens` where given)."""
        return self.query.apply(k, tokens)


@dataclass(frozen=True)
class SequencePositions:
    table: RopeTable
    logn: bool
    window: int | None = None  # set for rerope, leaky-rerope and self-extend
    leak: float = 0.0
    group: int = 0  # self-extend's G; 0 for the others
    chunk: tuple[int, int] | None = None  # dca: (chunk_size, local_size)

    @property
    def chunk_len(self) -> int | None:
        return None if self.chunk is None else dca.chunk_len(*self.chunk)

    @property
    def cache_key(self) -> tuple:
        """What decides a cached key besides its token and position (the prefix cache's hash covers it):
        the exact rotary frequencies and factor (so `dynamic`'s effective scale too), log-n, window, leak, group,
        DCA's chunk sizes."""
        key = self.__dict__.get("_cache_key")
        if key is None:
            inv_freq = tuple(self.table.inv_freq.flatten().tolist())
            key = (inv_freq, float(self.table.attention_factor), self.logn, self.window, self.leak, self.group, self.chunk)
            object.__setattr__(self, "_cache_key", key)
        return key


def longrope_table(config, device: torch.device) -> tuple[RopeTable | None, int | None]:
    """A `longrope` model's long table and the length past which it applies; (None, None) for other models.

    transformers switches tables inside one generate call, as soon as a position passes the original length,
    so keys cached before the switch keep the short rotation. Here a request picks one table for its whole
    length (prompt + max_tokens), as `dynamic` fixes its scale: every cached key stays right, and a prompt
    that starts past the original length gets exactly transformers' rotation.
    """
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    if rope_parameters.get("rope_type") != "longrope":
        return None, None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original = rope_parameters["original_max_position_embeddings"]
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](config, device, seq_len=original + 1)
    return RopeTable(inv_freq.float().to(device), float(attention_factor)), original


def served_position(spec: PositionSpec, config, trained_len: int) -> PositionSpec:
    """The server's position setting as it will be reported: the model's own DCA where its config asks for it
    (dca_default), the window or chunk sizes in use rather than "default". A size past the trained length
    raises ValueError naming the field."""
    spec = dca_default(spec, config)
    if spec.clipped:
        return spec.model_copy(update={"window": spec.window_for(trained_len)})
    if spec.type == "dca":
        chunk_size, local_size = spec.chunk_sizes(trained_len)
        return spec.model_copy(update={"chunk_size": chunk_size, "local_size": local_size})
    return spec


def dca_default(spec: PositionSpec, config) -> PositionSpec:
    """The position a model is served with when --position leaves the model's own: Dual Chunk Attention where
    config.json carries `dual_chunk_attention_config` (Qwen2.5-*-1M: their model card serves them so), else
    `spec` unchanged."""
    settings = getattr(config, "dual_chunk_attention_config", None)
    if spec.type != "rope" or not settings:
        return spec
    chosen = spec.model_copy(update={"type": "dca", "chunk_size": settings.get("chunk_size"),
                                     "local_size": settings.get("local_size")})
    log.info("this model's config.json carries dual_chunk_attention_config: serving it with Dual Chunk Attention "
             "(chunk_size %s, local_size %s), as its model card does; --position chooses another",
             chosen.chunk_size, chosen.local_size)
    return chosen


class Positions:
    def __init__(self, model, default_spec: PositionSpec, device: torch.device):
        config = model.config
        facts = ModelFacts.of(config)
        self.head_dim, self.rope_base, self.trained_len = facts.head_dim, facts.rope_base, facts.trained_len
        self.default_spec = default_spec
        self.device = device
        rotary = model.model.rotary_emb
        # Plain `rope` keeps the model's own table, whatever rope type its config names.
        # (original_inv_freq: the loaded table, where a forward past longrope's original length has switched inv_freq)
        inv_freq = getattr(rotary, "original_inv_freq", rotary.inv_freq)
        self.model_table = RopeTable(inv_freq.float().to(device), float(getattr(rotary, "attention_scaling", 1.0)))
        self.long_table, self.long_past = longrope_table(config, device)
        self._tables: dict[PositionSpec, RopeTable] = {}

    def own_table(self, seq_len: int) -> RopeTable:
        """The model's own table for a sequence that may reach seq_len tokens: Phi-3's `longrope` turns with
        its long factors past its original length, and with the short ones (the loaded table) within it."""
        return self.long_table if self.long_past is not None and seq_len > self.long_past else self.model_table

    def for_sequence(self, spec: PositionSpec | None, seq_len: int) -> SequencePositions:
        spec = spec or self.default_spec
        if spec.type == "dca":
            return SequencePositions(self.own_table(seq_len), spec.logn, chunk=spec.chunk_sizes(self.trained_len))
        if spec.clipped:
            window = spec.window_for(self.trained_len)
            return SequencePositions(self.own_table(seq_len), spec.logn, window, spec.leak(), spec.group_size())
        if self.is_identity(spec, seq_len):
            return SequencePositions(self.own_table(seq_len), spec.logn)
        if spec.type == "dynamic":  # one table per length: cheap to build, not worth keeping
            return SequencePositions(self._build(spec, seq_len), spec.logn)
        if spec not in self._tables:
            self._tables[spec] = self._build(spec, seq_len)
        return SequencePositions(self._tables[spec], spec.logn)

    def _build(self, spec: PositionSpec, seq_len: int) -> RopeTable:
        table = rope_table(spec, self.head_dim, self.rope_base, self.trained_len, seq_len)
        return RopeTable(table.inv_freq.to(self.device), table.attention_factor)

    def is_identity(self, spec: PositionSpec, seq_len: int) -> bool:
        """True where `spec` leaves the model's own table unchanged, exactly."""
        if spec.type == "dynamic":
            return seq_len <= self.trained_len
        return spec.type == "rope" or spec.factor == 1.0

    def encode(self, rows: list[SequencePositions], positions: torch.Tensor, row_of_token: torch.Tensor,
               dtype: torch.dtype) -> Encoding:
        """Encoding for a step's flat tokens at `positions` [tokens], token t using rows[row_of_token[t]].

        The per-row settings travel as one small tensor (one copy); every rotation is per token, so rows with
        different tables, windows, leaks and groups share each call."""
        tables = list({id(row.table): row.table for row in rows}.values())
        settings = torch.tensor([[tables.index(row.table) for row in rows], [row.window is not None for row in rows],
                                 [row.window or 1 for row in rows], [row.leak for row in rows],
                                 [row.group for row in rows], [row.logn for row in rows],
                                 [row.table.attention_factor for row in rows], [row.chunk_len or 0 for row in rows],
                                 [(row.chunk or (0, 0))[0] for row in rows]], dtype=torch.float64)
        table_of, clipped, window, leak, group, logn, factor, length, chunk_size = (
            to_device(settings, positions.device)[:, row_of_token])
        if len(tables) == 1:
            inv_freq, factor = tables[0].inv_freq, tables[0].attention_factor
        else:
            inv_freq = torch.stack([table.inv_freq for table in tables])[table_of.long()]  # [tokens, d/2]
            factor = factor.float().unsqueeze(-1)
        query = self._rotation(inv_freq, positions, factor, dtype)
        key_at, clipping, chunks = positions, None, None
        if any(row.window is not None for row in rows):
            clipped, window, group, leak = clipped.bool(), window.long(), group.long(), leak.float()
            grouped = group if any(row.group for row in rows) else None
            key_at = torch.where(clipped, far_key_positions(positions, leak, grouped), key_at)
            far_query = self._rotation(inv_freq, far_query_positions(positions, window, leak, grouped), factor, dtype)
            clipping = Clipping(clipped, window, far_query)
        if any(row.chunk is not None for row in rows):  # patches/dca.py
            chunked, length = length > 0, length.long().clamp(min=1)
            key_at = torch.where(chunked, dca.key_positions(positions, length), key_at)
            chunks = ChunkQueries(*(self._rotation(inv_freq, at, factor, dtype)
                                    for at in dca.query_positions(positions, length, chunk_size.long())))
        key = query if key_at is positions else self._rotation(inv_freq, key_at, factor, dtype)
        query_scale = None
        if any(row.logn for row in rows):
            scale = logn_factors(positions, self.trained_len)
            query_scale = torch.where(logn.bool(), scale, torch.ones_like(scale))[:, None, None].to(dtype)
        return Encoding(query, key, query_scale, clipping, chunks)

    @staticmethod
    def _rotation(inv_freq, positions: torch.Tensor, factor, dtype: torch.dtype) -> Rotation:
        cos, sin = cos_sin(inv_freq, positions, factor)  # [tokens, d]: one angle per token, shared by its heads
        return Rotation(cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype))
