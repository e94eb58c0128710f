"""The step's attention (attention.py over attention_backend.py) against a naive full-matrix reference, on mixed
steps: decode rows and prefill chunks of different lengths, plain rows, ReRoPE with different windows, Leaky
ReRoPE, Self-Extend and log-n side by side, blocks in shuffled order, prefix blocks shared by two rows and
beams that share all but their last block.

The reference shares nothing with the engine's split into near and far calls: for each query it builds the
relative distance D[i, j] to every key the naive way (patches/README.md, section 1), turns the query by D[i, j]
against the unrotated key, and takes a plain softmax over keys j <= i.

And memory follows the step's tokens: a 16k-token row beside 31 short rows takes attention scratch under twice
the KV bytes the step reads (measured as the peak RSS of a process of its own)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from longserve.patches.rope import PositionSpec, cos_sin, rotate_half
from longserve.server.engine.native import paged_decode
from longserve.server.engine.native.attention import StepAttention
from longserve.server.engine.native.kv_cache import BLOCK_SIZE, KvPool
from longserve.server.engine.native.kv_quant import cache_format
from longserve.server.engine.native.positions import Positions
from longserve.server.engine.native.step_inputs import StepInputs, StepRow
from longserve.server.engine.native.attention_backend import PADDING, UNBOUNDED, GatherBackend, RowBand
from tests.conftest import tiny_model

TRAINED = 32  # the tiny model's trained length: log-n acts past it
HEADS, KV_HEADS, DIM = 4, 2, 16


@dataclass
class Row:
    """A sequence of the test: its raw (unrotated) q, k, v for every position, its position spec, its blocks."""

    spec: PositionSpec
    length: int
    q: torch.Tensor = None
    k: torch.Tensor = None
    v: torch.Tensor = None
    block_table: list[int] = field(default_factory=list)
    positions: object = None


def distance(spec: PositionSpec, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    r = (i - j).float()
    if not spec.clipped:
        return r
    window = spec.window_for(TRAINED)
    if spec.type == "self-extend":
        return torch.where(r < window, r, (i // spec.group - j // spec.group + window - window // spec.group).float())
    leak = 1.0 / spec.k if spec.type == "leaky-rerope" else 0.0
    return torch.where(r < window, r, window + (r - window) * leak)


def reference(row: Row, first: int, end: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Attention output [end - first, heads, d] of queries [first, end) over keys [0, i], the naive way."""
    outs = []
    keys = row.k.repeat_interleave(HEADS // KV_HEADS, 1).double()  # [length, heads, d]
    values = row.v.repeat_interleave(HEADS // KV_HEADS, 1).double()
    for i in range(first, end):
        j = torch.arange(i + 1)
        cos, sin = cos_sin(inv_freq, distance(row.spec, torch.tensor(i), j))  # [i + 1, d]
        q = row.q[i].double()  # [heads, d]
        turned = q.unsqueeze(0) * cos[:, None].double() + rotate_half(q).unsqueeze(0) * sin[:, None].double()
        scores = (turned * keys[: i + 1]).sum(-1) / math.sqrt(DIM)  # [i + 1, heads]
        if row.spec.logn:
            scores = scores * max(1.0, math.log(i + 1) / math.log(TRAINED))
        outs.append((scores.softmax(0).unsqueeze(-1) * values[: i + 1]).sum(0))
    return torch.stack(outs)


def build_rows(seed: int) -> list[Row]:
    generator = torch.Generator().manual_seed(seed)
    rows = [
        Row(PositionSpec(type="rope"), 41),
        Row(PositionSpec(type="rerope", window=8), 45),
        Row(PositionSpec(type="rerope", window=8), 47),  # a beam of the row above: all but the last block shared
        Row(PositionSpec(type="leaky-rerope", window=12, k=4, logn=True), 60),
        Row(PositionSpec(type="self-extend", window=8, group=4), 53),
        Row(PositionSpec(type="rope", logn=True), 70),
        Row(PositionSpec(type="rerope", window=20), 36),
        Row(PositionSpec(type="rope"), 200),
        Row(PositionSpec(type="rope"), 41),  # shares the first row's prefix blocks
    ]
    for row in rows:
        row.q = torch.randn(row.length, HEADS, DIM, generator=generator)
        row.k = torch.randn(row.length, KV_HEADS, DIM, generator=generator)
        row.v = torch.randn(row.length, KV_HEADS, DIM, generator=generator)
    for beam, shared in ((2, 1), (8, 0)):  # same tokens, so the same cached keys, where blocks are shared
        same = 32
        for plane in ("q", "k", "v"):
            getattr(rows[beam], plane)[:same] = getattr(rows[shared], plane)[:same]
    free = list(range(1, 200))
    random.Random(seed).shuffle(free)
    for row in rows:
        row.block_table = [free.pop() for _ in range(-(-row.length // BLOCK_SIZE))]
    rows[2].block_table[:2] = rows[1].block_table[:2]
    rows[8].block_table[:2] = rows[0].block_table[:2]
    return rows


def run_step(attention_rows: list[tuple[Row, int, int]], pool, positions, backend, device, dtype):
    """One step of `attention_rows` (row, first, end) through StepAttention for layer 0: the flat output."""
    seqs = {id(row): SimpleNamespace(all_ids=[0] * row.length, block_table=row.block_table, positions=row.positions)
            for row, _, _ in attention_rows}
    step = StepInputs.build([StepRow(seqs[id(row)], first, end) for row, first, end in attention_rows], device)
    if any(row.positions.window is not None for row, _, _ in attention_rows):
        pool.ensure_near_keys()
    encoding = positions.encode([row.positions for row, _, _ in attention_rows], step.positions, step.row_of_token, dtype)
    attention = StepAttention(pool, step, encoding, backend)
    cat = lambda plane: torch.cat([getattr(row, plane)[first:end] for row, first, end in attention_rows]).to(device, dtype)
    return attention(0, cat("q"), cat("k"), cat("v"))


def check_mixed_steps(device: str, dtype: torch.dtype, tolerance: float, cache_dtype: str = "auto",
                      paged: bool = False) -> None:
    device = torch.device(device)
    model = tiny_model("llama", seed=3, hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       head_dim=DIM, max_position_embeddings=TRAINED, num_hidden_layers=1)
    positions = Positions(model, PositionSpec(type="rope"), device)
    inv_freq = positions.model_table.inv_freq.cpu()
    pool = KvPool(1, KV_HEADS, DIM, 200, dtype, device, near_keys=False, budgets_near_keys=True,
                  cache=cache_format(cache_dtype))
    pool.prepare(199)
    backend = GatherBackend(HEADS, KV_HEADS, DIM**-0.5, pool.num_blocks, device, paged=paged)
    rows = build_rows(seed=1)
    for row in rows:
        row.positions = positions.for_sequence(row.spec, row.length)
    # step 1 fills prefixes (the shared blocks once); step 2 mixes decode rows and prefill chunks of every kind
    first_step = [(rows[0], 0, 40), (rows[1], 0, 33), (rows[3], 0, 16), (rows[5], 0, 20), (rows[7], 0, 199),
                  (rows[4], 0, 30), (rows[6], 0, 35)]
    second_step = [(rows[2], 32, 46), (rows[8], 32, 40)]
    third_step = [(rows[0], 40, 41), (rows[1], 33, 34), (rows[2], 46, 47), (rows[7], 199, 200), (rows[6], 35, 36),
                  (rows[8], 40, 41), (rows[3], 16, 60), (rows[4], 30, 53), (rows[5], 20, 70)]
    for attention_rows in (first_step, second_step, third_step):
        got = run_step(attention_rows, pool, positions, backend, device, dtype).float().cpu()
        expected = torch.cat([reference(row, first, end, inv_freq) for row, first, end in attention_rows]).float()
        at = 0
        for row, first, end in attention_rows:
            torch.testing.assert_close(got[at : at + end - first], expected[at : at + end - first], rtol=tolerance,
                                       atol=tolerance, msg=lambda m, row=row, first=first: f"{row.spec} from {first}: {m}")
            at += end - first


def decode_paths():
    """Decode rows gathered, and read in place by the paged kernel where it builds here (paged_decode.py)."""
    reason = "no C compiler here: the C kernels did not build"
    return [pytest.param(False, id="gathered"),
            pytest.param(True, id="paged", marks=pytest.mark.skipif(paged_decode.library() is None, reason=reason))]


@pytest.mark.parametrize("paged", decode_paths())
def test_mixed_steps_match_the_naive_full_matrix_reference(paged):
    check_mixed_steps("cpu", torch.float32, 1e-4, paged=paged)


@pytest.mark.parametrize("paged", decode_paths())
def test_mixed_steps_match_the_reference_in_bfloat16(paged):
    check_mixed_steps("cpu", torch.bfloat16, 0.05, paged=paged)


# Over an 8-bit cache (kv_quant.py), against the same float64 reference: twice the worst error measured here on
# these O(1) values (float32 / bfloat16: int8 0.016 / 0.018, fp8_e4m3 0.079 / 0.073, fp8_e5m2 0.19 / 0.15).
# A misplaced scale or slot gives errors of the values' own size.
QUANTIZED_TOLERANCE = {"int8": 0.04, "fp8": 0.16, "fp8_e5m2": 0.4}


@pytest.mark.parametrize("paged", decode_paths())
@pytest.mark.parametrize("cache_dtype", sorted(QUANTIZED_TOLERANCE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_mixed_steps_over_an_8_bit_cache_stay_near_the_reference(cache_dtype, dtype, paged):
    check_mixed_steps("cpu", dtype, QUANTIZED_TOLERANCE[cache_dtype], cache_dtype, paged)


def test_one_query_rows_are_grouped_so_padding_stays_within_a_quarter_of_the_blocks_read():
    lengths = [16384] + [64 + 7 * i for i in range(31)]
    rows = [SimpleNamespace(all_ids=[0] * n, block_table=list(range(1, 1 + -(-n // BLOCK_SIZE))), positions=None)
            for n in lengths]
    step = StepInputs.build([StepRow(row, n - 1, n) for row, n in zip(rows, lengths)], torch.device("cpu"))
    backend = GatherBackend(4, 2, 0.25, 2000, torch.device("cpu"), paged=False)
    plan = backend.plan(step, [RowBand(index, 0, UNBOUNDED) for index in range(len(lengths))], need_lse=False)
    padded = sum(group.rows * group.width for group in plan.groups)
    assert padded <= PADDING * sum(-(-n // BLOCK_SIZE) * BLOCK_SIZE for n in lengths)  # whole blocks move
    assert sorted(group.rows for group in plan.groups)[-1] < len(lengths)  # the long row is not padded beside the rest


SCRATCH_PROBE = r"""
import json, random, resource, sys
import torch
from types import SimpleNamespace
from longserve.patches.rope import PositionSpec
from longserve.server.engine.native.attention import StepAttention
from longserve.server.engine.native.attention_backend import PADDING, UNBOUNDED, GatherBackend, RowBand
from longserve.server.engine.native.kv_cache import BLOCK_SIZE, KvPool
from longserve.server.engine.native.kv_quant import cache_format
from longserve.server.engine.native.positions import Positions
from longserve.server.engine.native.step_inputs import StepInputs, StepRow
from tests.conftest import tiny_model

torch.set_num_threads(1)
kv_heads, dim, heads = 8, 128, 32
lengths = [16384] + [64] * 31
blocks = sum(-(-n // BLOCK_SIZE) for n in lengths) + 1
model = tiny_model("llama", seed=3, hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                   head_dim=dim, num_hidden_layers=1, intermediate_size=64)
positions = Positions(model, PositionSpec(type="rope"), torch.device("cpu"))
pool = KvPool(1, kv_heads, dim, blocks, torch.float32, torch.device("cpu"), near_keys=False)
pool.keys[0].data.normal_(); pool.values[0].data.normal_()  # touched, so only scratch adds to the peak
free = list(range(1, blocks)); random.Random(0).shuffle(free)  # no row's blocks are consecutive: every key is gathered
rows = []
for n in lengths:
    rows.append(SimpleNamespace(all_ids=[0] * n, block_table=[free.pop() for _ in range(-(-n // BLOCK_SIZE))],
                                positions=positions.for_sequence(None, n)))
step = StepInputs.build([StepRow(row, n - 1, n) for row, n in zip(rows, lengths)], torch.device("cpu"))
encoding = positions.encode([row.positions for row in rows], step.positions, step.row_of_token, torch.float32)
backend = GatherBackend(heads, kv_heads, dim**-0.5, blocks, torch.device("cpu"), paged=sys.argv[1] == "paged")
attention = StepAttention(pool, step, encoding, backend)
q, k, v = torch.randn(32, heads, dim), torch.randn(32, kv_heads, dim), torch.randn(32, kv_heads, dim)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
attention(0, q, k, v)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
read = sum(lengths) * kv_heads * dim * 4 * 2  # keys and values
print(json.dumps({"scratch": after - before, "read": read}))
"""


@pytest.mark.parametrize("paged", decode_paths())
def test_a_long_row_beside_short_rows_takes_scratch_under_twice_the_kv_bytes_read(paged):
    """Rows x longest would gather 32 x 16k keys (2 GiB a plane here); the step reads 34 MiB of keys and values."""
    path = "paged" if paged else "gathered"
    probe = subprocess.run([sys.executable, "-c", SCRATCH_PROBE, path], capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr
    figures = json.loads(probe.stdout.strip().splitlines()[-1])
    assert figures["scratch"] < 2 * figures["read"], figures
