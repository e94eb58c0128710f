"""Rotary positions per sequence: which table each sequence uses, and applying it.

Every sequence carries its own table (patches/rope.py), fixed when it is
created, so one batch can mix requests with different position settings.

Cache choice: keys are rotated *before* they are cached. A table never
changes during a request, so a cached key stays right for every later step.
That makes every type here consistent, `dynamic` included: its scale is fixed
once per request from prompt length + max_tokens (not re-derived as the
sequence grows, which would leave old keys at an old scale). Schemes that
need the relative distance at attention time (ReRoPE) must instead cache keys
before rotation and rotate what they read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patches.rope import PositionSpec, RopeTable, cos_sin, logn_factors, rope_table


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class Encoding:
    """What one forward pass needs: cos/sin [rows, 1, tokens, d] and an optional query scale."""

    cos: torch.Tensor
    sin: torch.Tensor
    query_scale: torch.Tensor | None  # [rows, 1, tokens, 1]; None when no row uses log-n

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cos + rotate_half(x) * self.sin

    def rotate_query(self, q: torch.Tensor) -> torch.Tensor:
        q = self.rotate(q)
        return q if self.query_scale is None else q * self.query_scale

    rotate_key = rotate


@dataclass(frozen=True)
class SequencePositions:
    table: RopeTable
    logn: bool


class Positions:
    def __init__(self, model, default_spec: PositionSpec, device: torch.device):
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope_parameters = getattr(config, "rope_parameters", None) or {}
        self.base = float(rope_parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        self.trained_len = config.max_position_embeddings
        self.default_spec = default_spec
        self.device = device
        rotary = model.model.rotary_emb
        # Plain `rope` keeps the model's own table, whatever rope type its config names.
        self.model_table = RopeTable(rotary.inv_freq.float().to(device), float(getattr(rotary, "attention_scaling", 1.0)))
        self._tables: dict[PositionSpec, RopeTable] = {}

    def for_sequence(self, spec: PositionSpec | None, seq_len: int) -> SequencePositions:
        spec = spec or self.default_spec
        if self.is_identity(spec, seq_len):
            return SequencePositions(self.model_table, spec.logn)
        if spec.type == "dynamic":  # one table per length: cheap to build, not worth keeping
            return SequencePositions(self._build(spec, seq_len), spec.logn)
        if spec not in self._tables:
            self._tables[spec] = self._build(spec, seq_len)
        return SequencePositions(self._tables[spec], spec.logn)

    def _build(self, spec: PositionSpec, seq_len: int) -> RopeTable:
        table = rope_table(spec, self.head_dim, self.base, self.trained_len, seq_len)
        return RopeTable(table.inv_freq.to(self.device), table.attention_factor)

    def is_identity(self, spec: PositionSpec, seq_len: int) -> bool:
        """True where `spec` leaves the model's own table unchanged, exactly."""
        if spec.type == "dynamic":
            return seq_len <= self.trained_len
        return spec.type == "rope" or spec.factor == 1.0

    def encode(self, rows: list[SequencePositions], positions: torch.Tensor, dtype: torch.dtype) -> Encoding:
        """Encoding for positions [rows, tokens], row i using rows[i]."""
        if all(row.table is rows[0].table for row in rows):
            inv_freq = rows[0].table.inv_freq
            factor: float | torch.Tensor = rows[0].table.attention_factor
        else:
            inv_freq = torch.stack([row.table.inv_freq for row in rows]).unsqueeze(1)  # [rows, 1, d/2]
            factor = torch.tensor([row.table.attention_factor for row in rows], device=positions.device).view(-1, 1, 1)
        cos, sin = cos_sin(inv_freq, positions, factor)
        query_scale = None
        if any(row.logn for row in rows):
            scale = logn_factors(positions, self.trained_len)
            wanted = torch.tensor([row.logn for row in rows], device=positions.device).unsqueeze(1)
            query_scale = torch.where(wanted, scale, torch.ones_like(scale))[:, None, :, None].to(dtype)
        return Encoding(cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype), query_scale)
