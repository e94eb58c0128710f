"""The decoder layer's element-wise steps in C (server/engine/native/elementwise.py, elementwise.c) against the
model families' own torch modules and patches/rope.py's rotate: in bfloat16 bit for bit, in float32 to its
rounding; a norm of another formula, or another activation, stays on the torch path and still gives the
module's answer."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from longserve.patches import rope
from longserve.server.engine.native import c_kernels
from longserve.server.engine.native.elementwise import AddNorm, SiluMul, rotate, write_keys_and_values

pytestmark = pytest.mark.skipif(c_kernels.library() is None, reason="no C compiler here: the kernels did not build")

CPU = torch.device("cpu")
NORMS = [LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm, Qwen3RMSNorm, Phi3RMSNorm]
ROWS = [1, 15, 16, 70]  # under and over the rows at which the C loops go parallel


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def norm_of(kind, dim: int, dtype: torch.dtype) -> torch.nn.Module:
    norm = kind(dim, eps=1e-6).to(dtype)
    norm.weight.data = randn(dim, seed=dim, dtype=dtype)
    return norm


@pytest.mark.parametrize("kind", NORMS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("rows", ROWS)
def test_the_residual_add_and_norm_are_the_modules_own_in_bfloat16_bit_for_bit(kind, rows):
    norm = norm_of(kind, 96, torch.bfloat16)
    add_norm = AddNorm(norm, CPU, torch.bfloat16)
    assert add_norm.fused
    hidden, delta = randn(rows, 96, seed=1, scale=3, dtype=torch.bfloat16), randn(rows, 96, seed=2, dtype=torch.bfloat16)
    expected_hidden = hidden + delta
    summed, normed = add_norm(hidden.clone(), delta)
    assert torch.equal(summed, expected_hidden) and torch.equal(normed, norm(expected_hidden))
    alone = add_norm(hidden.clone())  # the first layer: nothing to add yet
    assert torch.equal(alone[0], hidden) and torch.equal(alone[1], norm(hidden))


@pytest.mark.parametrize("rows", ROWS)
def test_in_float32_the_norm_differs_from_the_module_by_rounding_only(rows):
    norm = norm_of(LlamaRMSNorm, 96, torch.float32)
    add_norm = AddNorm(norm, CPU, torch.float32)
    hidden, delta = randn(rows, 96, seed=3, scale=3), randn(rows, 96, seed=4)
    summed, normed = add_norm(hidden.clone(), delta)
    assert add_norm.fused and torch.equal(summed, hidden + delta)
    torch.testing.assert_close(normed, norm(hidden + delta), rtol=2e-6, atol=1e-6)


def test_a_norm_of_another_formula_stays_in_torch_and_answers_as_its_module():
    class OnePlusWeight(LlamaRMSNorm):  # Gemma's form, with the attribute names of Llama's
        def forward(self, hidden):
            variance = hidden.float().pow(2).mean(-1, keepdim=True)
            return ((1 + self.weight.float()) * hidden.float() * torch.rsqrt(variance + self.variance_epsilon)).to(hidden.dtype)

    norm = norm_of(OnePlusWeight, 64, torch.bfloat16)
    add_norm = AddNorm(norm, CPU, torch.bfloat16)
    hidden, delta = randn(3, 64, seed=5, dtype=torch.bfloat16), randn(3, 64, seed=6, dtype=torch.bfloat16)
    assert not add_norm.fused
    summed, normed = add_norm(hidden, delta)
    assert torch.equal(normed, norm(hidden + delta)) and torch.equal(hidden, randn(3, 64, seed=5, dtype=torch.bfloat16))


@pytest.mark.parametrize("rows", ROWS)
def test_silu_times_up_is_torchs_in_bfloat16_bit_for_bit_and_to_rounding_in_float32(rows):
    silu = ACT2FN["silu"]
    for dtype in (torch.bfloat16, torch.float32):
        gate_up = randn(rows, 2 * 80, seed=rows, scale=4, dtype=dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        fused = SiluMul("silu", silu, CPU, dtype)
        assert fused.fused
        if dtype == torch.bfloat16:
            assert torch.equal(fused(gate_up), silu(gate) * up)
        else:
            torch.testing.assert_close(fused(gate_up), silu(gate) * up, rtol=1e-6, atol=1e-7)


def test_silu_stays_finite_and_right_far_out_and_another_activation_stays_in_torch():
    gate_up = torch.tensor([[-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    out = SiluMul("silu", ACT2FN["silu"], CPU, torch.float32)(gate_up)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate_up[:, :6]), rtol=1e-6, atol=1e-30)
    gelu = SiluMul("gelu", ACT2FN["gelu"], CPU, torch.float32)
    assert not gelu.fused
    assert torch.equal(gelu(gate_up), ACT2FN["gelu"](gate_up[:, :6]) * gate_up[:, 6:])


@pytest.mark.parametrize("tokens", ROWS)
def test_the_rotation_is_ropes_own_in_bfloat16_bit_for_bit_and_to_rounding_in_float32(tokens):
    heads, kv_heads, dim = 9, 3, 64
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    for dtype in (torch.bfloat16, torch.float32):
        cos, sin = (table.unsqueeze(1).to(dtype) for table in rope.cos_sin(inv_freq, torch.arange(tokens) * 37 + 5))
        qkv = randn(tokens, (heads + 2 * kv_heads) * dim, seed=tokens, scale=2, dtype=dtype)
        q = qkv[:, : heads * dim].view(tokens, heads, dim)  # a view with the projection's row stride, as the engine's
        k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
        for x in (q, k):
            if dtype == torch.bfloat16:
                assert torch.equal(rotate(x, cos, sin), rope.rotate(x, cos, sin))
            else:
                torch.testing.assert_close(rotate(x, cos, sin), rope.rotate(x, cos, sin), rtol=1e-6, atol=1e-6)
    mixed = rotate(q.float(), cos.double(), sin.double())  # tables of another dtype: rope.rotate's own promotion
    assert mixed.dtype == torch.float64 and torch.equal(mixed, rope.rotate(q.float(), cos.double(), sin.double()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_cache_write_puts_each_key_and_value_where_index_copy_puts_it_and_refuses_a_slot_outside(dtype):
    kv_heads, dim, slots = 3, 64, 80
    qkv = randn(5, (9 + 2 * kv_heads) * dim, seed=7, dtype=dtype)
    k = qkv[:, 9 * dim : (9 + kv_heads) * dim].view(5, kv_heads, dim)  # views with the projection's row stride
    v = qkv[:, (9 + kv_heads) * dim :].view(5, kv_heads, dim)
    at = torch.tensor([3, 17, 16, 79, 40])
    planes = [randn(kv_heads, slots, dim, seed=seed, dtype=dtype) for seed in (8, 9)]
    expected = [plane.clone().index_copy_(1, at, x.transpose(0, 1)) for plane, x in zip(planes, (k, v))]
    assert write_keys_and_values(*planes, at, k, v)
    assert torch.equal(planes[0], expected[0]) and torch.equal(planes[1], expected[1])
    with pytest.raises(IndexError, match="outside the KV planes' 80 slots"):
        write_keys_and_values(*planes, torch.tensor([2, 80, 1, 0, 4]), k, v)
    assert torch.equal(planes[0], expected[0])  # nothing written
