"""The 8-bit KV cache (server/engine/native/kv_quant.py): round trips within their stated bounds, the pool's token
counts, and the flag's refusals (native and vLLM)."""

from __future__ import annotations

import pytest
import torch

from longserve.patches.model_facts import ModelFacts
from longserve.server.engine.native.kv_cache import BLOCK_SIZE, KvPool, sized_pool
from longserve.server.engine.native.kv_quant import FORMATS, cache_format, dequantize, quantize, scale_dtype
from longserve.server.engine.vllm import cache_dtype_args

# The stated bounds, per value x of a vector whose stored scale is s (kv_quant.py's docstring):
# int8 rounds to the nearest multiple of s; fp8 keeps 3 (e4m3) or 2 (e5m2) mantissa bits, down to its smallest
# subnormal (2^-9 and 2^-16 of s), where the error is half that step.
RELATIVE = {"int8": 0.0, "fp8": 2**-4, "fp8_e4m3": 2**-4, "fp8_e5m2": 2**-3}
ABSOLUTE_IN_SCALES = {"int8": 0.5, "fp8": 2**-10, "fp8_e4m3": 2**-10, "fp8_e5m2": 2**-17}
QUANTIZED = ["int8", "fp8", "fp8_e5m2"]


def vectors(dtype: torch.dtype) -> torch.Tensor:
    """[tokens, heads, d]: normal values, tokens with an outlier channel 1000x the rest, a vector of zeros, a tiny
    vector and a huge one."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 64, generator=generator)
    x[5:20, :, 7] = 1000.0  # an outlier channel, as keys have
    x[30, 1] = 0.0
    x[31, 2] *= 1e-6
    x[32, 0] *= 1e4
    return x.to(dtype)


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_round_trip_stays_within_the_stated_bound(name, dtype):
    cache = cache_format(name)
    x = vectors(dtype)
    kept = x.clone()
    codes, scales = quantize(x, cache, scale_dtype(dtype))
    assert torch.equal(x, kept)  # the input is left as it was
    assert codes.dtype == cache.stored and codes.shape == x.shape and scales.shape == x.shape[:2]
    assert scales.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)  # two bytes either way
    back = dequantize(codes, scales, cache, dtype)
    assert back.dtype == dtype and torch.isfinite(back).all()
    exact = x.float()
    s = scales.float().unsqueeze(-1)
    rounding = 2**-8 if dtype == torch.bfloat16 else 0.0  # the final rounding to bfloat16 (half an ulp, relative)
    bound = RELATIVE[name] * exact.abs() + ABSOLUTE_IN_SCALES[name] * s + rounding * exact.abs() * (1 + RELATIVE[name])
    error = (back.float() - exact).abs()
    assert (error <= bound * 1.001 + 1e-30).all(), f"worst excess {(error - bound).max().item()}"
    assert (back[30, 1] == 0).all()  # zeros stay zeros
    # the scale follows each vector's own largest value: an outlier token costs its own vector only
    assert (scales[5:20, :].float() > 100 * scales[40:, :].float().max()).all()
    normal = (error[40:] / exact[40:].abs().amax(-1, keepdim=True)).max()
    assert normal <= max(RELATIVE[name], 1 / 254) + 2 * rounding + 1e-3


def test_int8_error_is_a_small_share_of_each_vector_in_practice():
    """The bound above, read as a figure: on normal vectors the worst int8 error is under 1/254 of the vector's
    largest value (plus the float16 scale's own rounding), the mean far below it."""
    x = torch.randn(4096, 8, 128, generator=torch.Generator().manual_seed(1))
    codes, scales = quantize(x, FORMATS["int8"], torch.float16)
    error = (dequantize(codes, scales, FORMATS["int8"], torch.float32) - x).abs() / x.abs().amax(-1, keepdim=True)
    assert error.max() <= 1 / 254 * (1 + 2**-10) and error.mean() < 1 / 400


def test_every_format_writes_and_reads_through_a_pool_plane():
    for name in QUANTIZED:
        pool = KvPool(2, 3, 64, 8, torch.float32, torch.device("cpu"), near_keys=True, cache=cache_format(name))
        pool.prepare(7)
        x = vectors(torch.float32)[:20]
        slots = torch.arange(100, 120)
        pool.keys[1].write(slots, x)
        codes, scales = pool.keys[1].data[:, 100:120], pool.keys[1].scales[:, 100:120]
        back = dequantize(codes, scales, pool.cache, torch.float32).transpose(0, 1)
        expected_codes, _ = quantize(x, pool.cache, torch.float16)
        assert torch.equal(codes.transpose(0, 1), expected_codes)
        assert torch.allclose(back, x, rtol=RELATIVE[name] + 1e-3, atol=float(scales.float().max()))
        pool.copy_block(100 // BLOCK_SIZE, 2)  # copy on write moves codes and scales together
        assert torch.equal(pool.keys[1].data[:, 2 * BLOCK_SIZE:3 * BLOCK_SIZE], pool.keys[1].data[:, 96:112])
        assert torch.equal(pool.keys[1].scales[:, 2 * BLOCK_SIZE:3 * BLOCK_SIZE], pool.keys[1].scales[:, 96:112])


BUNDLED = ModelFacts(head_dim=64, rope_base=100000.0, trained_len=8192, num_layers=30, num_heads=9, num_kv_heads=3,
                     vocab_size=49152)
LLAMA_8B = ModelFacts(head_dim=128, rope_base=500000.0, trained_len=8192, num_layers=32, num_heads=32, num_kv_heads=8,
                      vocab_size=128256)


@pytest.mark.parametrize("facts", [BUNDLED, LLAMA_8B], ids=["bundled", "llama-8b-shape"])
@pytest.mark.parametrize("near_keys", [False, True])
def test_the_same_budget_holds_3_5x_the_tokens_of_float32_and_1_9x_those_of_bfloat16(facts, near_keys):
    def tokens(dtype, name):
        return sized_pool(facts, dtype, torch.device("cpu"), 4.0, 1024, near_keys=near_keys, cache=cache_format(name)).num_tokens

    for name in QUANTIZED:
        assert tokens(torch.float32, name) >= 3.5 * tokens(torch.float32, "auto")
        assert tokens(torch.bfloat16, name) >= 1.9 * tokens(torch.bfloat16, "auto")


def test_the_start_up_log_and_metrics_report_the_pool_in_tokens(caplog):
    from longserve.server.engine.metrics import Metrics

    with caplog.at_level("INFO", logger="longserve.engine"):
        pool = sized_pool(BUNDLED, torch.bfloat16, torch.device("cpu"), 0.25, 1024, near_keys=False,
                          cache=cache_format("int8"))
    assert f"{pool.num_tokens} tokens fit" in caplog.text and "int8, one scale per token and head" in caplog.text
    metrics = Metrics("m")
    metrics.set_kv_cache_size(pool.num_tokens, "int8")
    assert f'longserve:kv_cache_tokens{{kv_cache_dtype="int8",model_name="m"}} {float(pool.num_tokens)}' in \
        metrics.render().decode()


def test_an_unknown_cache_dtype_names_the_choices():
    with pytest.raises(ValueError, match="auto, int8, fp8, fp8_e4m3, fp8_e5m2"):
        cache_format("int3")


def test_vllm_gets_the_dtype_where_its_backend_stores_it_and_refuses_it_in_one_line_where_not(monkeypatch):
    assert cache_dtype_args("auto", 64, cuda=False) == {}
    assert cache_dtype_args("int8", 128, cuda=True) == {"kv_cache_dtype": "int8_per_token_head"}
    assert cache_dtype_args("fp8_e5m2", 128, cuda=True) == {"kv_cache_dtype": "fp8_e5m2"}
    with pytest.raises(ValueError, match="stores fp8 only; pass fp8"):
        cache_dtype_args("int8", 64, cuda=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True)
    assert cache_dtype_args("fp8", 64, cuda=False) == {"kv_cache_dtype": "fp8"}
    with pytest.raises(ValueError, match="divisible by 32"):
        cache_dtype_args("fp8", 80, cuda=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(ValueError, match="AVX-512 or AMX"):
        cache_dtype_args("fp8", 64, cuda=False)


def test_engine_auto_takes_the_native_engine_for_a_dtype_vllm_cannot_store_here():
    from longserve.server.cli import pick_engine
    from longserve.server.settings import ServerSettings

    if torch.cuda.is_available():
        pytest.skip("vLLM stores int8 on CUDA")
    assert pick_engine(ServerSettings(engine="auto", kv_cache_dtype="int8")) == "native"
