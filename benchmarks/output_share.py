"""How much of the native engine thread's step time goes to output processing (the engine's emit: incremental
detokenizing, stop strings, the hand-off to the event loop), at a given concurrency: the bundled model, 256
tokens in, 64 out, greedy, EOS ignored. Issue 30 asks to move it off the engine thread unless it costs under
5 % of a step at concurrency 32.

    python benchmarks/output_share.py [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from longserve.server.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from longserve.server.engine.config import EngineConfig  # noqa: E402
from longserve.server.engine.native.engine import NativeEngine  # noqa: E402
from longserve.server.engine.native.loading import speed_flags  # noqa: E402
from longserve.server.models import DEFAULT_MODEL, resolve  # noqa: E402

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "tinyshakespeare.txt")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="output_share", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    engine = NativeEngine(EngineConfig(model_path=str(resolve(DEFAULT_MODEL)), model_name=DEFAULT_MODEL,
                                       max_num_seqs=args.concurrency, kv_cache_memory=2.0))
    spent = {"output": 0.0, "steps": 0.0}

    def timed(name, work):
        def run(*given, **named):
            started = time.perf_counter()
            try:
                return work(*given, **named)
            finally:
                spent[name] += time.perf_counter() - started
        return run

    engine.emit, engine._step = timed("output", engine.emit), timed("steps", engine._step)
    ids = engine.tokenizer.encode(open(TEXT).read()[: 8 * args.prompt_tokens * args.concurrency])

    async def one(index: int) -> None:
        prompt = ids[index * args.prompt_tokens : (index + 1) * args.prompt_tokens]
        params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
        async for _ in engine.generate(GenerationRequest(f"share-{index}", [prompt], params)):
            pass

    async def all_at_once() -> None:
        await asyncio.gather(*(one(i) for i in range(args.concurrency)))

    try:
        asyncio.run(all_at_once())
    finally:
        engine.shutdown()
    print(f"output_share: CPU flags {speed_flags()}, dtype {engine.dtype}, concurrency {args.concurrency}")
    print(f"engine steps {spent['steps']:.2f} s, of which output processing {spent['output']:.3f} s "
          f"({100 * spent['output'] / spent['steps']:.1f} %)")


if __name__ == "__main__":
    main()
