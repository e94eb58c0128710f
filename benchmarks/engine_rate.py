"""Decode rate of the native engine at 1, 4 and 16 concurrent sequences,
against transformers' `generate` single stream on the same prompts.

    python benchmarks/engine_rate.py [--tokens 128] [--concurrency 1,4,16]

Every sequence decodes exactly --tokens tokens (ignore_eos), from short
prompts, greedy; the rate is generated tokens / wall time of the whole batch,
prefill included, after one warm-up run.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from longserve.server.engine.base import GenerationRequest, SamplingParams
from longserve.server.engine.config import EngineConfig
from longserve.server.engine.native.engine import NativeEngine
from longserve.server.models import DEFAULT_MODEL, resolve

PROMPTS = [
    "The history of the Roman Empire",
    "A recipe for bread starts with",
    "In the beginning of the computer age,",
    "The most important rule of chess is",
]


async def engine_rate(engine: NativeEngine, tokenizer, concurrency: int, tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> int:
        prompt = tokenizer.encode(PROMPTS[i % len(PROMPTS)])
        count = 0
        async for delta in engine.generate(GenerationRequest(f"bench-{concurrency}-{i}", [prompt], params)):
            count = delta.completion_tokens
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(concurrency)))
    return sum(counts) / (time.perf_counter() - started)


def hf_rate(model, tokenizer, tokens: int) -> float:
    total, elapsed = 0, 0.0
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        elapsed += time.perf_counter() - started
        total += out.shape[1] - ids.shape[1]
    return total / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,4,16")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    engine = NativeEngine(EngineConfig(model_path=str(resolve(args.model)), model_name=args.model, max_num_seqs=max(levels)))
    tokenizer = engine.tokenizer
    print(f"model {args.model}, {engine.device}, {engine.dtype}, torch threads {torch.get_num_threads()}, {args.tokens} tokens per sequence")

    async def run_engine() -> dict[int, float]:
        await engine_rate(engine, tokenizer, 1, 8)  # warm-up
        return {c: await engine_rate(engine, tokenizer, c, args.tokens) for c in levels}

    rates = asyncio.run(run_engine())
    engine.shutdown()
    hf_rate(engine.model, tokenizer, 8)  # warm-up
    hf = hf_rate(engine.model, tokenizer, args.tokens)

    single = rates.get(1)
    print(f"{'setting':<28}{'tok/s':>10}{'vs HF generate':>16}{'vs our single':>15}")
    print(f"{'HF generate, 1 stream':<28}{hf:>10.1f}{1.0:>15.2f}x{'':>15}")
    for c, rate in rates.items():
        ours = f"{rate / single:>14.2f}x" if single else ""
        print(f"{f'native engine, {c} concurrent':<28}{rate:>10.1f}{rate / hf:>15.2f}x{ours}")


if __name__ == "__main__":
    main()
