"""The native engine on CUDA, on a tiny random model: greedy equality with transformers in bfloat16, ReRoPE and DCA
rows beside plain rows giving the CPU engine's tokens, and the attention backend against its naive reference on mixed
steps, over the unquantized and the 8-bit caches. Skipped, saying why, where there is no CUDA device; benchmarks/gpu_check.py runs it first on a lent GPU."""

from __future__ import annotations

import asyncio

import pytest
import torch

from longserve.patches.rope import PositionSpec
from longserve.server.engine.base import GenerationRequest, SamplingParams
from tests.conftest import make_engine, tiny_model
from tests.test_isolation import run_all

if not torch.cuda.is_available():
    pytest.skip("no CUDA device here; benchmarks/gpu_check.py runs these on a GPU machine", allow_module_level=True)

TOKENS = 12


def greedy(request_id: str, prompt: list[int], position: PositionSpec | None = None) -> GenerationRequest:
    request = GenerationRequest(request_id, [prompt], SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True))
    request.position = position
    return request


def test_greedy_equals_transformers_in_bfloat16(tokenizer):
    model = tiny_model("llama", seed=7).to("cuda", torch.bfloat16)
    prompt = [5, 6, 7, 8, 9]
    expected = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=TOKENS, min_new_tokens=TOKENS,
                              do_sample=False)[0, len(prompt):].tolist()
    engine = make_engine(model, tokenizer, device="cuda", dtype="bfloat16", max_model_len=128)
    try:
        [(tokens, error)] = asyncio.run(run_all(engine, [greedy("g", prompt)]))
    finally:
        engine.shutdown()
    assert error is None and tokens == expected


def test_rerope_and_dca_rows_beside_plain_rows_give_the_cpu_engines_tokens(tokenizer):
    prompts = [[5 + i, 6, 7, 8] * 20 for i in range(5)]
    positions = [None, PositionSpec(type="rerope", window=16), None, PositionSpec(type="rerope", window=32),
                 PositionSpec(type="dca", chunk_size=24, local_size=8)]  # 80 tokens: five DCA chunks of 16
    answers = {}
    for device in ("cpu", "cuda"):
        model = tiny_model("llama", seed=11).to(device)
        engine = make_engine(model, tokenizer, device=device, dtype="float32", max_model_len=256)
        try:
            answers[device] = asyncio.run(run_all(engine, [greedy(f"r{i}", p, s) for i, (p, s) in enumerate(zip(prompts, positions))]))
        finally:
            engine.shutdown()
    assert all(error is None for _, error in answers["cuda"])
    assert answers["cuda"] == answers["cpu"]


def test_the_attention_backend_matches_the_naive_reference_on_mixed_steps_in_bfloat16():
    """tests/test_attention_backend.py's mixed steps (decode rows and prefill chunks, plain, ReRoPE with two windows,
    Leaky ReRoPE with log-n, Self-Extend, shared and beam blocks), on CUDA through the explicit path."""
    from tests.test_attention_backend import check_mixed_steps

    check_mixed_steps("cuda", torch.bfloat16, 0.05)
    check_mixed_steps("cuda", torch.float32, 1e-4)


def test_the_same_mixed_steps_over_an_8_bit_cache_on_cuda():
    """The int8 and fp8 caches (kv_quant.py) on CUDA: quantized on write, read back through the explicit path, within
    the tolerances the CPU test states."""
    from tests.test_attention_backend import QUANTIZED_TOLERANCE, check_mixed_steps

    for cache_dtype, tolerance in QUANTIZED_TOLERANCE.items():
        check_mixed_steps("cuda", torch.bfloat16, tolerance, cache_dtype)
