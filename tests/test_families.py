"""Model families beyond Llama 2's shape: Qwen3 (per-head q/k RMSNorm), Llama 3.x (its own `llama3` rope
scaling) and Phi-3 (fused projections, `longrope`), against transformers in float32: greedy generate alone and batched, plain and ntk-mixed, and ReRoPE
and Self-Extend against the naive reference; and the position types a model's own scaling refuses."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from longserve.patches.model_facts import ModelFacts
from longserve.patches.rope import PositionSpec, rope_table
from tests.conftest import make_engine, running_server, tiny_model
from tests.test_engine import PROMPTS, engine_greedy, hf_greedy
from tests.test_rerope import Driver, assert_logits_close, engine_for, prompt, reference_logits

LLAMA3 = {"rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 128}}
# Phi-3: fused qkv and gate_up, and longrope: short factors within 64 tokens, long ones past (head_dim 16: 8 each)
PHI3 = {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                         "long_factor": [2.0**i for i in range(8)]}, "original_max_position_embeddings": 64}
FAMILIES = {"qwen3": ("qwen3", {}), "llama3": ("llama", LLAMA3), "phi3": ("phi3", PHI3)}


def with_table(model, spec: PositionSpec, seq_len: int):
    """`model` rotating with our table for `spec`: the reference for a scaled type."""
    facts = ModelFacts.of(model.config)
    table = rope_table(spec, facts.head_dim, facts.rope_base, facts.trained_len, seq_len)
    model.model.rotary_emb.inv_freq = table.inv_freq
    model.model.rotary_emb.attention_scaling = table.attention_factor
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_matches_generate_alone_and_batched(name, tokenizer):
    family, overrides = FAMILIES[name]
    model = tiny_model(family, seed=3, **overrides)
    engine = make_engine(model, tokenizer, max_num_seqs=4, prefill_chunk=16)
    try:
        # 5 to 76 tokens, + 20: Phi-3's 76-token prompt passes 64 and turns with longrope's long factors, the others not
        prompts = [tokenizer.encode(p) * k for p, k in zip(PROMPTS, (1, 3, 6, 2, 4))]
        expected = [hf_greedy(model, ids, 20, eos=False) for ids in prompts]
        assert asyncio.run(engine_greedy(engine, prompts[:1], 20, ignore_eos=True)) == expected[:1]
        assert asyncio.run(engine_greedy(engine, prompts, 20, ignore_eos=True, stagger=0.02)) == expected
    finally:
        engine.shutdown()


@pytest.mark.parametrize("family", ["qwen3", "phi3"])  # Phi-3 without longrope (Phi-3-mini-4k's plain table)
def test_ntk_mixed_matches_generate_with_the_same_table(family, tokenizer):
    spec = PositionSpec(type="ntk-mixed", factor=2.0)
    model = tiny_model(family, seed=4, max_position_embeddings=64)
    engine = make_engine(model, tokenizer, max_num_seqs=4, prefill_chunk=16, position=spec)
    try:
        prompts = [tokenizer.encode(p) * k for p, k in zip(PROMPTS, (4, 2, 3))]  # past the 64 trained positions
        reference = with_table(tiny_model(family, seed=4, max_position_embeddings=64), spec, 128)
        expected = [hf_greedy(reference, ids, 16, eos=False) for ids in prompts]
        assert asyncio.run(engine_greedy(engine, prompts, 16, ignore_eos=True, stagger=0.02)) == expected
    finally:
        engine.shutdown()


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("spec", [PositionSpec(type="rerope", window=16, logn=True), PositionSpec(type="self-extend", window=12, group=3)],
                         ids=["rerope", "self-extend"])
def test_clipped_types_match_the_naive_reference(name, spec, tokenizer):
    family, overrides = FAMILIES[name]
    if name == "llama3":  # the trained length here is 64: the scaling's own original length must be below it
        overrides = {"rope_scaling": {**LLAMA3["rope_scaling"], "original_max_position_embeddings": 16}}
    if name == "phi3":  # likewise: 32, so these 86 tokens turn with the long factors
        overrides = {**PHI3, "original_max_position_embeddings": 32}
    driver = Driver(engine_for(13, tokenizer, family, overrides, position=spec))
    seq, prefill = driver.start(prompt(tokenizer, 80, "q"), spec, chunk=24)
    steps = [driver.step([seq])[0] for _ in range(6)]
    expected = reference_logits(13, spec, seq.all_ids[: len(seq.prompt_ids) + len(steps)], family, **overrides)
    assert_logits_close(torch.stack(prefill + steps), expected)


@pytest.mark.server
def test_a_models_own_rope_scaling_refuses_the_types_that_would_drop_it(tokenizer):
    model = tiny_model("llama", seed=5, **LLAMA3)
    assert ModelFacts.of(model.config).rope_type == "llama3"
    with pytest.raises(ValueError, match="scales its own rotary positions"):
        make_engine(model, tokenizer, position=PositionSpec(type="ntk-mixed", factor=2.0))
    engine = make_engine(model, tokenizer, max_model_len=256)
    with running_server(engine) as url:
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
        refused = httpx.post(f"{url}/v1/completions", json={**body, "position": {"type": "yarn", "factor": 2}})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "position"
        assert "rope_type 'llama3'" in refused.json()["error"]["message"]
        for allowed in ({"type": "rope"}, {"type": "rerope", "window": 64}):
            assert httpx.post(f"{url}/v1/completions", json={**body, "position": allowed}).status_code == 200


def test_what_the_engine_cannot_serve_exactly_is_refused_in_one_line(tokenizer):
    with pytest.raises(ValueError, match="sliding-window attention \\(32 tokens\\).*--max-model-len 32 or less"):
        make_engine(tiny_model("mistral", seed=6, sliding_window=32), tokenizer, max_model_len=256)
    with pytest.raises(ValueError, match="caps its logits \\(final_logit_softcapping\\)"):
        make_engine(tiny_model("llama", seed=6, final_logit_softcapping=30.0), tokenizer, max_model_len=256)
    with pytest.raises(ValueError, match="rotates only part of each head \\(partial_rotary_factor 0.75\\)"):
        make_engine(tiny_model("phi3", seed=6, partial_rotary_factor=0.75), tokenizer, max_model_len=256)  # Phi-4-mini's
    make_engine(tiny_model("mistral", seed=6, sliding_window=32), tokenizer, max_model_len=32).shutdown()  # within the window
    make_engine(tiny_model("qwen3", seed=6, partial_rotary_factor=None), tokenizer, max_model_len=256).shutdown()  # null: whole head
