"""The paged decode kernel (server/engine/native/paged_decode.c) against a float64 reference written here.

The kernel reads a plane's blocks in place through the block table, widening each code as it goes. The
reference reads the same plane the plain way: torch's own widening of every code times its scale, the slots
looked up one by one, a softmax over the span in float64. Shapes cover GQA groups of 1, 3, 4 and 7, the head
sizes the kernel specializes (64, 128), 96 (in bfloat16 its vector path takes any multiple of 32) and two
that take its plain loops (48, 80), spans that start mid-block, cross the kernel's splits (SPLIT_KEYS) and
hold one key or none."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from longserve.server.engine.native import paged_decode
from longserve.server.engine.native.kv_cache import BLOCK_SIZE, KvPool
from longserve.server.engine.native.kv_quant import cache_format

pytestmark = pytest.mark.skipif(paged_decode.library() is None, reason="no C compiler here: the kernel did not build")

BLOCKS = 200


def filled_pool(cache_dtype: str, dtype: torch.dtype, kv_heads: int, dim: int, seed: int) -> KvPool:
    pool = KvPool(1, kv_heads, dim, BLOCKS, dtype, torch.device("cpu"), near_keys=False, cache=cache_format(cache_dtype))
    pool.prepare(BLOCKS - 1)
    generator = torch.Generator().manual_seed(seed)
    slots = torch.arange(BLOCKS * BLOCK_SIZE)
    for plane in (pool.keys[0], pool.values[0]):
        values = torch.randn(len(slots), kv_heads, dim, generator=generator) * 2
        values[::7, :, 3] *= 50  # outlier channels
        plane.write(slots, values.to(dtype))
    return pool


def read_plainly(plane) -> torch.Tensor:
    """[kv_heads, slots, d] float64, as torch widens the stored codes."""
    if plane.scales is None:
        return plane.data.double()
    return plane.data.view(plane.cache.codes).double() * plane.scales.double().unsqueeze(-1)


def reference(q, keys, values, table, items, scale):
    """(out, lse, and each output's weighted mean of |value|: what a relative error in every weight scales)."""
    kv_heads = keys.shape[0]
    outs, lses, magnitudes = [], [], []
    for query, (row, k0, k1) in zip(q.double(), items.tolist()):
        at = torch.arange(k0, k1)
        slots = table[row].long()[at // BLOCK_SIZE] * BLOCK_SIZE + at % BLOCK_SIZE
        folded = query.view(kv_heads, -1, query.shape[-1])
        scores = folded @ keys[:, slots].transpose(-1, -2) * scale  # [kv, group, span]
        if k1 > k0:
            outs.append((scores.softmax(-1) @ values[:, slots]).reshape(query.shape))
            magnitudes.append((scores.softmax(-1) @ values[:, slots].abs()).reshape(query.shape))
            lses.append(scores.logsumexp(-1).reshape(-1))
        else:
            outs.append(torch.zeros_like(query))
            magnitudes.append(torch.zeros_like(query))
            lses.append(torch.full((query.shape[0],), float("-inf"), dtype=torch.float64))
    return torch.stack(outs), torch.stack(lses), torch.stack(magnitudes)


BF16_ROUNDING = 2.0**-8  # bfloat16's unit roundoff: rounding moves a value by at most this share of itself


@pytest.mark.parametrize("cache_dtype", ["auto", "int8", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (8, 2, 128), (14, 2, 96), (2, 2, 48), (4, 1, 80)])
def test_the_kernel_matches_a_float64_reference(cache_dtype, dtype, heads, kv_heads, dim):
    pool = filled_pool(cache_dtype, dtype, kv_heads, dim, seed=dim + heads)
    table = torch.randperm(BLOCKS, generator=torch.Generator().manual_seed(1)).to(torch.int32)[:196].view(2, 98)
    width = 98 * BLOCK_SIZE
    items = torch.tensor([[0, 0, 300], [1, 17, width - 1], [0, 100, 100], [1, 0, width], [0, 555, 556],
                          [1, 513, 1100]], dtype=torch.int32)  # spans: plain, mid-block, none, 3 splits, one key
    q = torch.randn(len(items), heads, dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    out, lse = paged_decode.paged_decode(q, pool.keys[0], pool.values[0], table, items, dim**-0.5)
    expected, expected_lse, magnitude = reference(q, read_plainly(pool.keys[0]), read_plainly(pool.values[0]), table,
                                                  items, dim**-0.5)
    assert out.dtype == dtype  # a bfloat16 query gets a bfloat16 output, rounded once
    # float32 accumulation of O(1) products over up to 1,568 keys; the exponential is good to 2e-6 relative.
    # In bfloat16, the output is rounded once, and over a bfloat16 plane each weight is rounded before it
    # multiplies its value (as torch's CPU flash attention does): each moves the output by at most 2^-8 of
    # |output| and of the weighted mean of |value|.
    bound = 1e-4 + 1e-4 * expected.abs()
    if dtype == torch.bfloat16:
        bound += BF16_ROUNDING * (expected.abs() + (magnitude if cache_dtype == "auto" else 0))
    excess = (out.double() - expected).abs() - bound
    assert excess.max() <= 0, f"{int((excess > 0).sum())} outputs off by more than their bound; worst {float(excess.max())} over"
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e5m2"])
def test_every_finite_float8_code_widens_as_torch_reads_it(cache_dtype):
    """A span of one key returns that key's value exactly: values holding each of the 256 codes in turn."""
    cache = cache_format(cache_dtype)
    pool = KvPool(1, 1, 64, 1, torch.bfloat16, torch.device("cpu"), near_keys=False, cache=cache)
    pool.prepare(0)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    meaning = codes.view(cache.codes).float()
    finite = meaning.isfinite()  # no code quantize writes is inf or NaN
    pool.values[0].data[0, :4] = codes.view(4, 64)
    pool.values[0].scales.fill_(1.0)
    table = torch.zeros(1, 1, dtype=torch.int32)
    items = torch.tensor([[0, key, key + 1] for key in range(4)], dtype=torch.int32)
    out, _ = paged_decode.paged_decode(torch.randn(4, 1, 64), pool.keys[0], pool.values[0], table, items, 0.125)
    torch.testing.assert_close(out.flatten()[finite], meaning[finite], rtol=0, atol=0)


def load_in_a_fresh_process(tmp_path, **env) -> subprocess.CompletedProcess:
    script = ("import logging; logging.basicConfig(level=logging.INFO)\n"
              "from longserve.server.engine.native import paged_decode\n"
              "print('built' if paged_decode.library() else 'none')")
    environment = {**os.environ, "LONGSERVE_KERNEL_CACHE": str(tmp_path / "kernels"), **env}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=600)


def test_a_fresh_cache_builds_the_kernel_for_this_cpu(tmp_path):
    loaded = load_in_a_fresh_process(tmp_path)
    assert loaded.stdout.strip() == "built", loaded.stderr
    assert len(list((tmp_path / "kernels").glob("kernels-*.so"))) == 1


def test_without_a_compiler_decode_falls_back_to_the_gather_path_and_says_so(tmp_path):
    loaded = load_in_a_fresh_process(tmp_path, CC=str(tmp_path / "no-such-compiler"))
    assert loaded.stdout.strip() == "none", loaded.stderr
    assert "no C compiler found" in loaded.stderr and "install gcc" in loaded.stderr
    off = load_in_a_fresh_process(tmp_path, LONGSERVE_PAGED_DECODE="0")
    assert off.stdout.strip() == "none" and "LONGSERVE_PAGED_DECODE=0" in off.stderr
