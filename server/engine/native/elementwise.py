"""A decoder layer's element-wise steps: residual add and RMSNorm, SiLU times up, rotation, the cache write.

Each runs as one call into elementwise.c (c_kernels.py builds it) where that
gives what the model's own modules give, else as the modules' torch ops. The
C path serves CPU tensors in bfloat16 or float32, norms that compute
transformers' RMSNorm (checked once on a probe row, not by class name), the
SiLU activation, the rotate-half rotation of patches/rope.py's `rotate`, and
the write of a step's keys and values into an unquantized cache. In a decode
step of the bundled model this replaces about 40 small torch ops a layer
(docs/engine.md has the figures).
"""

from __future__ import annotations

import torch

from longserve.patches import rope
from longserve.server.engine.native import c_kernels

KINDS = {torch.float32: 0, torch.bfloat16: 1}  # elementwise.c's ELEMENT_F32, ELEMENT_BF16


def _runs_in_c(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in KINDS and c_kernels.library() is not None


class AddNorm:
    """(hidden + delta, norm(hidden + delta)) for a norm module; the sum is written into `hidden` on the C path."""

    def __init__(self, norm: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.norm = norm
        self.weight = getattr(norm, "weight", None)
        self.eps = getattr(norm, "variance_epsilon", None)
        self.fused = (_runs_in_c(device, dtype) and self.eps is not None and self.weight is not None
                      and self.weight.dtype == dtype and self.weight.dim() == 1 and self._agrees(dtype))

    def __call__(self, hidden: torch.Tensor, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fused:
            hidden = hidden if delta is None else hidden + delta
            return hidden, self.norm(hidden)
        return self._in_c(hidden, delta)

    def _in_c(self, hidden: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, delta = hidden.contiguous(), None if delta is None else delta.contiguous()
        out = torch.empty_like(hidden)
        rows, dim = hidden.numel() // hidden.shape[-1], hidden.shape[-1]
        c_kernels.library().add_rms_norm(hidden.data_ptr(), None if delta is None else delta.data_ptr(),
                                         self.weight.data_ptr(), out.data_ptr(), KINDS[hidden.dtype], rows, dim,
                                         self.eps, torch.get_num_threads())
        return hidden, out

    @torch.inference_mode()
    def _agrees(self, dtype: torch.dtype) -> bool:
        """Whether the C path gives what the module gives on a probe: a norm of another formula stays in torch."""
        probe = torch.randn(2, self.weight.shape[0], generator=torch.Generator().manual_seed(0)).to(dtype)
        delta = torch.randn(probe.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        expected = self.norm(probe + delta)
        got = self._in_c(probe.clone(), delta)[1]
        return torch.allclose(got.float(), expected.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


class SiluMul:
    """act(gate) * up from the gate/up projection's output [..., 2 * d] (gate first), for the model's activation."""

    def __init__(self, activation_name: str, activation, device: torch.device, dtype: torch.dtype):
        self.activation = activation
        self.fused = activation_name == "silu" and _runs_in_c(device, dtype)

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            gate, up = gate_up.chunk(2, dim=-1)
            return self.activation(gate) * up
        gate_up = gate_up.contiguous()
        dim = gate_up.shape[-1] // 2
        out = gate_up.new_empty(*gate_up.shape[:-1], dim)
        c_kernels.library().silu_mul(gate_up.data_ptr(), out.data_ptr(), KINDS[gate_up.dtype], out.numel() // dim, dim,
                                     torch.get_num_threads())
        return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope.rotate(x, cos, sin) for x [tokens, heads, d] and cos, sin [tokens, 1, d], as one call where it can."""
    fits = (_runs_in_c(x.device, x.dtype) and x.dim() == 3 and x.stride(-1) == 1 and cos.dtype == sin.dtype == x.dtype
            and cos.shape == sin.shape == (x.shape[0], 1, x.shape[2]) and cos.is_contiguous() and sin.is_contiguous())
    if not fits:
        return rope.rotate(x, cos, sin)
    tokens, heads, dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype)
    c_kernels.library().rotate(x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
                               KINDS[x.dtype], tokens, heads, dim, torch.get_num_threads())
    return out


def write_keys_and_values(keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor) -> bool:
    """k and v [tokens, kv_heads, d] into planes [kv_heads, slots, d] at `slots` (long), as index_copy_ would, in one
    call where it can; False where it cannot (the caller's torch path runs)."""
    fits = (_runs_in_c(keys.device, keys.dtype) and keys.dtype == values.dtype == k.dtype == v.dtype
            and keys.is_contiguous() and values.is_contiguous() and keys.shape == values.shape
            and k.shape == v.shape == (slots.shape[0], keys.shape[0], keys.shape[2]) and k.stride(-1) == v.stride(-1) == 1
            and slots.dtype == torch.long and slots.is_contiguous())
    if not fits:
        return False
    status = c_kernels.library().write_keys_and_values(
        keys.data_ptr(), values.data_ptr(), keys.shape[1], slots.data_ptr(), k.data_ptr(), k.stride(0), k.stride(1),
        v.data_ptr(), v.stride(0), v.stride(1), keys.element_size(), k.shape[0], k.shape[1], k.shape[2])
    if status != 0:
        raise IndexError(f"a cache slot lies outside the KV planes' {keys.shape[1]} slots")
    return True
