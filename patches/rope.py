"""Position scaling for rotary embeddings: pure functions of tensors.

Notation (patches/README.md, section 1): head dim d, pair index m = 0..d/2-1, rope base b0,
trained length L, scale factor s >= 1 (the `factor` field). Plain RoPE rotates pair m of the
vector at position n by n * theta_m with theta_m = b0^(-2m/d).

Every table here is a function of (head_dim, rope_base, trained length, spec) and
returns the inverse frequencies theta'_m plus an attention factor that
multiplies cos and sin (YaRN's mscale; 1 elsewhere). `logn_factors` gives the
per-position query scale of log-n attention. Nothing here knows about a model,
an engine or HTTP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

PositionType = Literal["rope", "linear", "ntk", "ntk-old", "ntk-mixed", "yarn", "dynamic", "rerope", "leaky-rerope", "self-extend",
                       "dca"]
POSITION_TYPES: tuple[str, ...] = PositionType.__args__
CLIPPED_TYPES = ("rerope", "leaky-rerope", "self-extend")  # patches/rerope.py: a near and a far form, split at a window
MAX_WINDOW = 2**24  # tokens: past any context served, and exact in float32 position arithmetic


class PositionFieldError(ValueError):
    """A setting this model cannot take, and the field to change (a request's 400 names it)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class PositionSpec(BaseModel):
    """How positions enter attention; the JSON of `--position` and of a request's `position`."""

    # Every bound is explicit and no float may be NaN or infinite: a client's value goes straight into a table.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    type: PositionType = "rope"
    factor: float = Field(1.0, ge=1.0, le=1024.0, description="s = target length / trained length")
    b: float = Field(0.625, ge=0.01, le=1.0, description="ntk-mixed exponent; 1 gives ntk, towards 0 linear")
    logn: bool = False
    beta_fast: float = Field(32.0, ge=0.001, le=10_000.0, description="yarn: rotations above which a pair is kept as trained")
    beta_slow: float = Field(1.0, ge=0.001, le=10_000.0, description="yarn: rotations below which a pair is interpolated")
    window: int | None = Field(None, ge=1, le=MAX_WINDOW, description="clipped types: where the far form starts (default: L/2 for rerope, L/4 for leaky-rerope and self-extend)")
    k: float = Field(16.0, ge=1.0, le=1e6, description="leaky-rerope: past the window, distance grows with slope 1/k")
    group: int = Field(4, ge=1, le=1024, description="self-extend: past the window, positions are grouped by floor division by G")
    chunk_size: int | None = Field(None, ge=2, le=MAX_WINDOW, description="dca: the farthest a query may stand, at most the trained length (default 3L/4)")
    local_size: int | None = Field(None, ge=1, le=MAX_WINDOW, description="dca: below chunk_size; chunks are chunk_size - local_size tokens (default L/16)")

    @model_validator(mode="after")
    def check(self):
        if self.type in ("rope", *CLIPPED_TYPES) and self.factor != 1.0:
            raise ValueError(f"type {self.type!r} takes no factor; set --max-model-len for the length to serve")
        if self.window is not None and self.type not in CLIPPED_TYPES:
            raise ValueError(f"'window' applies to {', '.join(CLIPPED_TYPES)}, not to {self.type!r}")
        if self.type == "dca" and self.factor != 1.0:
            raise ValueError("type 'dca' takes no factor; set --max-model-len for the length to serve")
        if self.type != "dca" and (self.chunk_size is not None or self.local_size is not None):
            raise ValueError(f"'chunk_size' and 'local_size' apply to 'dca', not to {self.type!r}")
        if self.chunk_size is not None and self.local_size is not None and self.local_size >= self.chunk_size:
            raise ValueError(f"'local_size' ({self.local_size}) must be below 'chunk_size' ({self.chunk_size})")
        if self.beta_slow >= self.beta_fast:
            raise ValueError("yarn needs beta_slow < beta_fast")
        return self

    @property
    def clipped(self) -> bool:
        return self.type in CLIPPED_TYPES

    def target_len(self, trained_len: int) -> int:
        return int(trained_len * self.factor)

    def window_for(self, trained_len: int) -> int:
        """The window given, or the default from the measured figures (README, "ReRoPE and Leaky ReRoPE"):
        for rerope L/2 beat L/4 in loss at every length and found 9/9 passkeys at 16k; leaky-rerope was
        measured best at L/4 (k 16); self-extend takes L/4 too until its own sweep says otherwise."""
        return self.window or (trained_len // 2 if self.type == "rerope" else trained_len // 4)

    def chunk_sizes(self, trained_len: int) -> tuple[int, int]:
        """DCA's (chunk_size, local_size): as given, else ChunkLlama's defaults, 3L/4 and L/16. ValueError
        naming the field where a query could stand past the trained length."""
        chunk_size = self.chunk_size or trained_len * 3 // 4
        local_size = self.local_size or max(1, trained_len // 16)
        if chunk_size > trained_len:
            raise PositionFieldError("chunk_size", f"'chunk_size' {chunk_size} is past this model's trained length "
                                                   f"{trained_len}: at most {trained_len}")
        if local_size >= chunk_size:
            raise PositionFieldError("local_size", f"'local_size' ({local_size}) must be below 'chunk_size' ({chunk_size})")
        return chunk_size, local_size

    def leak(self) -> float:
        """Slope of the distance past the window: 0 for rerope, 1/k for leaky-rerope, 1/G for self-extend."""
        return {"leaky-rerope": 1.0 / self.k, "self-extend": 1.0 / self.group}.get(self.type, 0.0)

    def group_size(self) -> int:
        """Self-extend's G (its far positions are floor(i / G), exact integers); 0 for the other types."""
        return self.group if self.type == "self-extend" else 0

    def past_reach(self, trained_len: int, max_len: int) -> str | None:
        """Self-extend keeps a distance d inside the trained length L only while its grouped form, about
        d / G + w - w / G, is under L: up to (L - w) G + w. What to change when `max_len` goes past; else None."""
        if self.type != "self-extend":
            return None
        window = self.window_for(trained_len)
        reach = (trained_len - window) * self.group + window
        if max_len <= reach:
            return None
        return (f"self-extend with window {window} and group {self.group} keeps positions inside the trained {trained_len} "
                f"up to {reach} tokens, and --max-model-len {max_len} goes past: raise group or lower --max-model-len")

    def describe(self) -> dict:
        """The fields that matter for this type, for /v1/models and reports."""
        keep = {"type", "logn"}
        if self.type != "rope":
            keep.add("factor")
        if self.type == "ntk-mixed":
            keep.add("b")
        if self.type == "yarn":
            keep |= {"beta_fast", "beta_slow"}
        if self.clipped:
            keep.discard("factor")
            keep.add("window")
        if self.type == "leaky-rerope":
            keep.add("k")
        if self.type == "self-extend":
            keep.add("group")
        if self.type == "dca":
            keep = {"type", "logn", "chunk_size", "local_size"}
        return self.model_dump(include=keep)


def check_composes(spec: PositionSpec, own_rope_type: str) -> None:
    """How our types compose with a model's own rotary scaling (Llama 3.x's llama3, a config's yarn...).
    `rope` is the model's own table, its scaling included; the clipped types and dca rotate with that table
    too, only by other distances, so both are defined. The other types rebuild the table from the base, which
    would drop the model's own scaling without saying so: refused."""
    if own_rope_type in ("default", None) or spec.type in ("rope", "dca") or spec.clipped:
        return
    raise ValueError(
        f"this model scales its own rotary positions (rope_type {own_rope_type!r}); position type {spec.type!r} "
        f"rebuilds the table from the base and would drop that scaling: use 'rope' (the model's own table) "
        f"or one of {', '.join(CLIPPED_TYPES)}, which keep it"
    )


@dataclass(frozen=True)
class RopeTable:
    inv_freq: torch.Tensor  # [d/2] float32
    attention_factor: float = 1.0  # multiplies cos and sin


def default_inv_freq(head_dim: int, rope_base: float) -> torch.Tensor:
    """theta_m = b0^(-2m/d)."""
    return 1.0 / rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def linear_inv_freq(head_dim: int, rope_base: float, factor: float) -> torch.Tensor:
    """Position interpolation: theta_m / s."""
    return default_inv_freq(head_dim, rope_base) / factor


def ntk_inv_freq(head_dim: int, rope_base: float, factor: float) -> torch.Tensor:
    """NTK-aware, fixed form: theta_m * s^(-2(m+1)/d)."""
    pair = torch.arange(1, head_dim // 2 + 1, dtype=torch.float32)
    return default_inv_freq(head_dim, rope_base) * factor ** (-2.0 * pair / head_dim)


def ntk_mixed_inv_freq(head_dim: int, rope_base: float, factor: float, b: float) -> torch.Tensor:
    """Beta-base mixed radix: theta_m * exp(-a (m+1)^b), a = ln s / (d/2)^b."""
    pair = torch.arange(1, head_dim // 2 + 1, dtype=torch.float32)
    a = math.log(factor) / (head_dim / 2) ** b
    return default_inv_freq(head_dim, rope_base) * torch.exp(-a * pair**b)


def ntk_old_inv_freq(head_dim: int, rope_base: float, factor: float) -> torch.Tensor:
    """Base change: b0' = b0 * s^(d/(d-2))."""
    return default_inv_freq(head_dim, rope_base * factor ** (head_dim / (head_dim - 2)))


def dynamic_inv_freq(head_dim: int, rope_base: float, factor: float, trained_len: int, seq_len: int) -> torch.Tensor:
    """Dynamic NTK: the base change with a scale taken from the sequence's own length.

    For seq_len <= L nothing changes; past it the effective scale is
    factor * seq_len / L - (factor - 1), the form transformers uses.
    """
    if seq_len <= trained_len:
        return default_inv_freq(head_dim, rope_base)
    scale = factor * seq_len / trained_len - (factor - 1)
    return default_inv_freq(head_dim, rope_base * scale ** (head_dim / (head_dim - 2)))


def yarn_table(head_dim: int, rope_base: float, factor: float, trained_len: int, beta_fast: float, beta_slow: float) -> RopeTable:
    """YaRN: pairs that turn many times within L keep their frequency, pairs that
    turn less than once are interpolated by s, a linear ramp in between; cos and
    sin are scaled by 0.1 ln s + 1."""
    extrapolated = default_inv_freq(head_dim, rope_base)
    interpolated = extrapolated / factor

    def pair_for_rotations(rotations: float) -> float:
        # the pair index m whose wavelength fits `rotations` times in L
        return head_dim * math.log(trained_len / (rotations * 2 * math.pi)) / (2 * math.log(rope_base))

    low = max(math.floor(pair_for_rotations(beta_fast)), 0)
    high = min(math.ceil(pair_for_rotations(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = interpolated * ramp + extrapolated * (1 - ramp)
    attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return RopeTable(inv_freq, attention_factor)


def rope_table(spec: PositionSpec, head_dim: int, rope_base: float, trained_len: int, seq_len: int | None = None) -> RopeTable:
    """The table for `spec`; `seq_len` (prompt + max tokens) fixes dynamic's scale."""
    factor = spec.factor
    if spec.type in ("rope", *CLIPPED_TYPES):  # clipped types keep the trained frequencies
        return RopeTable(default_inv_freq(head_dim, rope_base))
    if spec.type == "linear":
        return RopeTable(linear_inv_freq(head_dim, rope_base, factor))
    if spec.type == "ntk":
        return RopeTable(ntk_inv_freq(head_dim, rope_base, factor))
    if spec.type == "ntk-mixed":
        return RopeTable(ntk_mixed_inv_freq(head_dim, rope_base, factor, spec.b))
    if spec.type == "ntk-old":
        return RopeTable(ntk_old_inv_freq(head_dim, rope_base, factor))
    if spec.type == "yarn":
        return yarn_table(head_dim, rope_base, factor, trained_len, spec.beta_fast, spec.beta_slow)
    if spec.type == "dynamic":
        return RopeTable(dynamic_inv_freq(head_dim, rope_base, factor, trained_len, seq_len or trained_len))
    raise ValueError(f"unknown position type {spec.type!r}; valid: {', '.join(POSITION_TYPES)}")


def logn_factors(positions: torch.Tensor, trained_len: int) -> torch.Tensor:
    """Query scale for 0-based positions: max(1, ln n / ln L) with n = position + 1."""
    n = positions.to(torch.float32) + 1
    return torch.clamp(torch.log(n) / math.log(trained_len), min=1.0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn x by the angles whose cos and sin are given (rotate-half layout)."""
    return x * cos + rotate_half(x) * sin


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float | torch.Tensor = 1.0):
    """cos and sin of shape [..., d] for positions [...] (the rotate-half layout)."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    table = torch.cat((angles, angles), dim=-1)
    return table.cos() * attention_factor, table.sin() * attention_factor
