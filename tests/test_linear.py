"""The engine's linear layers (server/engine/native/linear.py): oneDNN's packed bfloat16 weights give what
F.linear gives, and an engine that loaded its own bf16 model drops the plain copies and answers as one that
keeps them. Skipped, saying why, where this torch cannot pack bf16 weights."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from longserve.server.engine.config import EngineConfig
from longserve.server.engine.native.engine import NativeEngine
from longserve.server.engine.native.linear import PackedLinear, packs
from tests.conftest import make_engine, tiny_model
from tests.test_engine import engine_greedy

pytestmark = pytest.mark.skipif(not packs(torch.device("cpu"), torch.bfloat16),
                                reason="this torch build does not pack bf16 weights with oneDNN")


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
