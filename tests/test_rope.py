"""Position tables against independent implementations, and their effect on a model."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from pydantic import ValidationError

from longserve.patches.hf import install_position
from longserve.patches.rope import PositionSpec, logn_factors, rope_table
from longserve.server.engine.base import GenerationRequest, SamplingParams
from tests.conftest import chat_ids, greedy_text, make_engine, tiny_model

HEAD_DIM, BASE, TRAINED = 64, 100000.0, 8192


def theta(m: int, d: int = HEAD_DIM, base: float = BASE) -> float:
    return base ** (-2 * m / d)


def table(spec: PositionSpec, seq_len: int | None = None):
    return rope_table(spec, HEAD_DIM, BASE, TRAINED, seq_len)


@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
def test_ntk_and_ntk_mixed_follow_the_written_out_formula(factor):
    ntk = table(PositionSpec(type="ntk", factor=factor)).inv_freq
    for b in (0.625, 0.75, 1.0):
        mixed = table(PositionSpec(type="ntk-mixed", factor=factor, b=b)).inv_freq
        a = math.log(factor) / (HEAD_DIM / 2) ** b
        expected = [theta(m) * math.exp(-a * (m + 1) ** b) for m in range(HEAD_DIM // 2)]
        assert torch.allclose(mixed, torch.tensor(expected), rtol=1e-5)
    lam = factor ** (2 / HEAD_DIM)
    assert torch.allclose(ntk, torch.tensor([theta(m) * lam ** -(m + 1) for m in range(HEAD_DIM // 2)]), rtol=1e-5)
    # b = 1 is ntk; the lowest frequency is divided by exactly k (linear at the far end)
    assert torch.allclose(table(PositionSpec(type="ntk-mixed", factor=factor, b=1.0)).inv_freq, ntk, rtol=1e-5)
    assert math.isclose(float(ntk[-1]), theta(HEAD_DIM // 2 - 1) / factor, rel_tol=1e-5)
    old = table(PositionSpec(type="ntk-old", factor=factor)).inv_freq
    new_base = BASE * factor ** (HEAD_DIM / (HEAD_DIM - 2))
    assert torch.allclose(old, torch.tensor([theta(m, base=new_base) for m in range(HEAD_DIM // 2)]), rtol=1e-5)


@pytest.mark.vllm
def test_ntk_tables_equal_vllm_when_installed():
    rotary = pytest.importorskip("vllm.model_executor.layers.rotary_embedding")
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):  # vLLM's rotary modules want a config in scope
        for b in (None, 0.625, 0.75):
            for factor in (2.0, 4.0):
                reference = rotary.NTKScalingRotaryEmbedding(HEAD_DIM, HEAD_DIM, TRAINED, BASE, True, factor, torch.float32, mixed_b=b)
                spec = PositionSpec(type="ntk", factor=factor) if b is None else PositionSpec(type="ntk-mixed", factor=factor, b=b)
                assert torch.allclose(table(spec).inv_freq, reference._compute_inv_freq(BASE), rtol=1e-5)


def hf_table(rope_type: str, seq_len: int | None = None, **params):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=TRAINED,
        rope_parameters={"rope_type": rope_type, "rope_theta": BASE, **params},
    )
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len) if seq_len else ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")


@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_linear_yarn_dynamic_equal_transformers(factor):
    inv, attention = hf_table("linear", factor=factor)
    assert torch.allclose(table(PositionSpec(type="linear", factor=factor)).inv_freq, inv, rtol=1e-6) and attention == 1.0
    inv, attention = hf_table("yarn", factor=factor, original_max_position_embeddings=TRAINED)
    ours = table(PositionSpec(type="yarn", factor=factor))
    assert torch.allclose(ours.inv_freq, inv, rtol=1e-6) and math.isclose(ours.attention_factor, attention)
    for seq_len in (4000, 12000, 30000):
        inv, _ = hf_table("dynamic", seq_len=seq_len, factor=factor)
        assert torch.allclose(table(PositionSpec(type="dynamic", factor=factor), seq_len).inv_freq, inv, rtol=1e-5)


def test_logn_scales_exactly_the_positions_past_trained_length():
    positions = torch.arange(0, 3 * TRAINED)
    scale = logn_factors(positions, TRAINED)
    assert torch.all(scale[:TRAINED] == 1.0)
    n = positions[TRAINED:].double() + 1
    assert torch.allclose(scale[TRAINED:].double(), torch.log(n) / math.log(TRAINED), rtol=1e-6)
    assert torch.all(scale[TRAINED:] > 1.0)


def test_bad_specs_are_rejected_with_the_valid_choices():
    with pytest.raises(ValidationError, match="ntk-mixed"):
        PositionSpec(type="bogus")
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        PositionSpec(type="ntk", factor=0.5)
    with pytest.raises(ValidationError, match="rope"):
        PositionSpec(type="rope", factor=2)
    with pytest.raises(ValidationError, match="extra"):
        PositionSpec(type="ntk", factr=2)


def prefill_logits(engine, ids: list[int], position: PositionSpec | None) -> torch.Tensor:
    """Next-token logits after `ids`, through the engine's runner (one sequence)."""
    from longserve.server.engine.native.sequence import Sequence

    seq = Sequence("probe", 0, ids, SamplingParams(max_tokens=1), lambda d: None, engine.tokenizer.backend_tokenizer, frozenset())
    seq.positions = engine.positions.for_sequence(position, len(ids) + 1)
    with engine._lock:
        assert engine.blocks.admit(seq, len(ids))
    try:
        return engine.runner.prefill(seq, 0, len(ids))
    finally:
        with engine._lock:
            engine.blocks.free(seq)


@pytest.fixture(scope="module")
def short_model_engine(tokenizer):
    """A tiny Llama trained (nominally) to 64 positions, so prompts go past L cheaply."""
    model = tiny_model("llama", seed=5, max_position_embeddings=64)
    engine = make_engine(model, tokenizer, max_model_len=512)
    engine.shutdown()  # the runner is driven directly or through a fresh engine below
    return model, engine


@pytest.mark.parametrize("spec_type", ["linear", "ntk", "ntk-old", "ntk-mixed", "yarn", "dynamic"])
def test_factor_one_and_logn_within_trained_length_change_nothing(short_model_engine, tokenizer, spec_type):
    model, engine = short_model_engine
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog, " * 3)[:60]
    plain = prefill_logits(engine, ids, PositionSpec())
    assert torch.equal(prefill_logits(engine, ids, PositionSpec(type=spec_type, factor=1.0)), plain)
    assert torch.equal(prefill_logits(engine, ids, PositionSpec(type=spec_type, factor=1.0, logn=True)), plain)


@pytest.mark.parametrize(
    "spec",
    [
        PositionSpec(type="ntk-mixed", factor=4, b=0.625),
        PositionSpec(type="ntk-mixed", factor=4, b=0.625, logn=True),
        PositionSpec(type="yarn", factor=4),
        PositionSpec(type="linear", factor=4, logn=True),
    ],
    ids=lambda s: f"{s.type}{'+logn' if s.logn else ''}",
)
def test_engine_matches_transformers_patched_by_the_installer(tokenizer, spec):
    """Past the trained length, the engine's greedy tokens equal transformers' with patches/hf.py."""
    model = tiny_model("llama", seed=6, max_position_embeddings=64)
    engine = make_engine(model, tokenizer, max_model_len=256, position=spec, prefill_chunk=48)
    try:
        ids = tokenizer.encode("It was the best of times, it was the worst of times, " * 10)[:150]

        async def run():
            tokens = []
            params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
            async for delta in engine.generate(GenerationRequest("r", [ids], params)):
                tokens += delta.token_ids
            return tokens

        got = asyncio.run(run())
    finally:
        engine.shutdown()
    reference = tiny_model("llama", seed=6, max_position_embeddings=64)
    install_position(reference, spec)
    out = reference.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got == out[0, len(ids):].tolist()


def test_per_request_position_overrides_the_server_setting(short_model_engine, tokenizer):
    model, engine = short_model_engine
    ids = tokenizer.encode("A long line of text to push past the trained window. " * 8)[:120]
    plain = prefill_logits(engine, ids, None)
    scaled = prefill_logits(engine, ids, PositionSpec(type="ntk-mixed", factor=2))
    assert not torch.allclose(plain, scaled)


def test_bundled_model_still_answers_with_ntk_mixed(bundled_model, tokenizer):
    # 16k tokens of the bundled model in float32, with the near-key plane's third kept: 1.05 GiB.
    engine = make_engine(bundled_model, tokenizer, position=PositionSpec(type="ntk-mixed", factor=2, logn=True), kv_cache_memory=1.25)
    try:
        assert engine.max_model_len == 16384
        assert "Paris" in greedy_text(engine, chat_ids(tokenizer, "What is the capital of France?"))
    finally:
        engine.shutdown()
