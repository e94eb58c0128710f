"""The engine's linear layers (server/engine/native/linear.py): bf16_matmul.c and oneDNN's packed bfloat16
weights give what F.linear gives, a row's result does not depend on its batch, and an engine that loaded its
own bf16 model drops the plain copies and answers as one that keeps them. Each test is skipped, saying why,
where its kernel cannot run here (a torch without oneDNN, a CPU without AVX512-BF16)."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
import torch.nn.functional as F

from longserve.server.engine.config import EngineConfig
from longserve.server.engine.native import c_kernels
from longserve.server.engine.native.engine import NativeEngine
from longserve.server.engine.native.linear import (SMALL_ROWS, Bf16Linear, Linear, PackedLinear, linear_maker,
                                                   packs, runs_bf16_matmul)
from longserve.server.engine.native.loading import cpu_flags
from tests.conftest import make_engine, tiny_model
from tests.test_engine import engine_greedy

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(not packs(CPU, torch.bfloat16), reason="this torch build does not pack bf16 weights with oneDNN")
needs_bf16_matmul = pytest.mark.skipif(not runs_bf16_matmul(CPU, torch.bfloat16),
                                       reason="bf16_matmul.c needs a CPU with AVX512-BF16 and a C compiler")


def operands(rows: int, in_features: int, out_features: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    bias = torch.randn(out_features, generator=generator).bfloat16()
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    return weight, bias, x


@needs_bf16_matmul
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 64])
@pytest.mark.parametrize("in_features, out_features", [(80, 96), (81, 70), (576, 33)])  # odd k; n past a tile of 32
def test_bf16_matmul_gives_what_f_linear_gives(rows, in_features, out_features):
    weight, bias, x = operands(rows, in_features, out_features, seed=rows + in_features)
    expected = F.linear(x.float(), weight.float(), bias.float())
    linear = Bf16Linear(weight, bias)
    # float32 sums in another order, rounded once: within a unit in the last place of bfloat16
    torch.testing.assert_close(linear(x).float(), expected, rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(Bf16Linear(weight, None)(x).float(), expected - bias.float(), rtol=2**-7, atol=1e-2)
    batched = x.view(rows, 1, in_features).expand(rows, 2, in_features)  # 3-d, and rows that are not contiguous
    assert torch.equal(linear(batched[:, 1]), linear(x)) and linear(batched).shape == (rows, 2, out_features)
    with pytest.raises(TypeError, match="bfloat16"):
        linear(x.float())


@needs_bf16_matmul
def test_a_bf16_matmul_row_does_not_depend_on_its_batch_or_the_threads():
    weight, bias, x = operands(21, 576, 200, seed=3)
    linear = Bf16Linear(weight, bias)
    together = linear(x)
    alone = torch.cat([linear(x[row : row + 1]) for row in range(len(x))])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = linear(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone) and torch.equal(together, one_thread)


@needs_bf16_matmul
@needs_onednn
def test_bf16_matmul_hands_calls_of_many_rows_to_its_onednn_copy():
    weight, bias, x = operands(SMALL_ROWS + 1, 64, 48, seed=5)
    onednn, own = PackedLinear(weight, bias), Bf16Linear(weight, bias)
    both = Bf16Linear(weight, bias, many_rows=onednn)
    assert torch.equal(both(x), onednn(x))
    assert torch.equal(both(x[:SMALL_ROWS]), own(x[:SMALL_ROWS]))


@needs_bf16_matmul
def test_the_engine_runs_bf16_matmul_here_unless_switched_off(monkeypatch):
    assert linear_maker(CPU, torch.bfloat16) is Bf16Linear or "amx_bf16" in cpu_flags()  # with AMX: a pair
    assert linear_maker(CPU, torch.float32) is not Bf16Linear
    monkeypatch.setenv("LONGSERVE_BF16_MATMUL", "0")
    assert linear_maker(CPU, torch.bfloat16) in (PackedLinear, Linear)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
def test_on_a_cpu_without_avx512_the_kernels_build_and_bf16_weights_go_to_onednn(tmp_path, monkeypatch):
    flags = ["-march=x86-64-v3" if flag == "-march=native" else flag for flag in c_kernels.FLAGS]  # AVX2 only
    built = tmp_path / "kernels-avx2.so"
    c_kernels.build("cc", flags, built)
    kernels = c_kernels.load(built)
    assert kernels.bf16_matmul_built() == 0
    monkeypatch.setattr(c_kernels, "library", lambda: kernels)
    assert not runs_bf16_matmul(CPU, torch.bfloat16)
    assert linear_maker(CPU, torch.bfloat16) is (PackedLinear if packs(CPU, torch.bfloat16) else Linear)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_a_packed_bf16_linear_gives_what_f_linear_gives(rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 80, generator=generator).bfloat16()
    bias = torch.randn(96, generator=generator).bfloat16()
    x = torch.randn(rows, 80, generator=generator).bfloat16()
    expected = F.linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(PackedLinear(weight, bias)(x).float(), expected, rtol=0.02, atol=0.05)
    torch.testing.assert_close(PackedLinear(weight, None)(x).float(), expected - bias.float(), rtol=0.02, atol=0.05)


def greedy(engine, prompt: list[int]) -> list[int]:
    return asyncio.run(engine_greedy(engine, [prompt], 12, ignore_eos=True))[0]


@pytest.mark.skipif(not (packs(CPU, torch.bfloat16) or runs_bf16_matmul(CPU, torch.bfloat16)),
                    reason="bf16 weights run unpacked here (F.linear): no copy to drop")
def test_an_engine_that_loads_its_bf16_model_drops_the_plain_weights_and_answers_the_same(tmp_path, tokenizer):
    model = tiny_model("llama", seed=4).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompt = [5, 6, 7, 8, 9, 10]
    kept = make_engine(model, tokenizer, dtype="bfloat16", max_model_len=128)
    try:
        expected = greedy(kept, prompt)
    finally:
        kept.shutdown()
    assert model.model.layers[0].mlp.down_proj.weight.numel() > 0  # a model the caller passed stays whole
    owned = NativeEngine(EngineConfig(model_path=str(tmp_path), model_name="tiny", dtype="bfloat16", device="cpu",
                                      max_model_len=128, kv_cache_memory=0.5))
    try:
        layer = owned.model.model.layers[0]
        assert layer.mlp.down_proj.weight.numel() == 0 and layer.self_attn.q_proj.weight.numel() == 0
        assert owned.model.model.embed_tokens.weight.numel() > 0
        assert greedy(owned, prompt) == expected
    finally:
        owned.shutdown()
