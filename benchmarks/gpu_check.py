"""The one script to run when a GPU is lent: the CUDA tests, then the native engine's output rate on an
8B-shaped model, in one table. Nothing is downloaded: the model is built from a Llama-3-8B-shaped config with
random weights (speed does not depend on the weights), the tokenizer is the bundled model's.

    python benchmarks/gpu_check.py                 # on the GPU machine (never run on one yet: aimed at 10 minutes;
                                                   # each cell prints as it ends, so a cut run keeps what it measured)
    python benchmarks/gpu_check.py --tiny --device cpu   # the same flow on a tiny model (the test runs this)

For each context (2k, 32k) and batch (1, 64, 256) it runs the batch twice, all rows plain and with a quarter
of them on {"type": "rerope", "window": 1024}: prompts of the context's length minus --tokens, then --tokens
greedy tokens each, EOS ignored. It prints output tokens per second (prefill included) and the ReRoPE mix's
ratio to plain. A cell whose KV cache would not fit --kv-gib is skipped, saying how much it needs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from longserve.patches.rope import PositionSpec  # noqa: E402
from longserve.server.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from longserve.server.engine.config import EngineConfig  # noqa: E402
from longserve.server.engine.native.engine import NativeEngine  # noqa: E402
from longserve.server.engine.native.loading import speed_flags  # noqa: E402

VOCAB = 49152  # the bundled tokenizer's, so generated ids detokenize (Llama 3 has 128k; the step cost differs little)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, vocab_size=VOCAB)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, rope_theta=10000.0, vocab_size=VOCAB)


def describe(device: str) -> str:
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        return f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU, {os.cpu_count()} cores, flags {speed_flags()}, torch {torch.__version__}"


def run_cuda_tests() -> str:
    """tests/test_cuda.py, as "passed", "skipped" (no CUDA: the module skips, saying why) or "failed"."""
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_cuda.py"])
    return {0: "passed", 5: "skipped"}.get(code, f"failed (pytest exit code {code})")


def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **shape)
    with torch.device(device):  # random weights made where they run: an 8B model in seconds, not a copy
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def kv_bytes(shape: dict, tokens: int, dtype: torch.dtype, planes: int) -> int:
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    per_token = shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * planes * dtype.itemsize
    return tokens * per_token


async def output_rate(engine: NativeEngine, batch: int, prompt_len: int, tokens: int, rerope_every: int) -> float:
    """Generated tokens per second of wall time for `batch` requests at once; every `rerope_every`-th row (0:
    none) asks for ReRoPE."""
    generator = torch.Generator().manual_seed(0)
    rerope = PositionSpec(type="rerope", window=min(1024, prompt_len // 2))

    async def one(index: int) -> int:
        prompt = torch.randint(100, VOCAB, (prompt_len,), generator=generator).tolist()
        request = GenerationRequest(f"gpu-{batch}-{index}", [prompt], SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
        if rerope_every and index % rerope_every == 0:
            request.position = rerope
        generated = 0
        async for delta in engine.generate(request):
            generated = delta.completion_tokens
        return generated

    started = time.perf_counter()
    generated = sum(await asyncio.gather(*(one(i) for i in range(batch))))
    return generated / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and small contexts: the flow, not the figures")
    parser.add_argument("--contexts", default=None, help="comma-separated (default 2048,32768; tiny 128,256)")
    parser.add_argument("--batches", default=None, help="comma-separated (default 1,64,256; tiny 1,4)")
    parser.add_argument("--tokens", type=int, default=32, help="generated per request")
    parser.add_argument("--kv-gib", type=float, default=None, help="KV cache (default 40 on CUDA, 1 on CPU)")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    shape = TINY if args.tiny else LLAMA3_8B
    contexts = [int(c) for c in (args.contexts or ("128,256" if args.tiny else "2048,32768")).split(",")]
    batches = [int(b) for b in (args.batches or ("1,4" if args.tiny else "1,64,256")).split(",")]
    kv_gib = args.kv_gib or (40.0 if args.device == "cuda" else 1.0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    print(f"gpu_check: {describe(args.device)}; model {'tiny' if args.tiny else 'Llama-3-8B-shaped'} in {dtype}", flush=True)
    tests = "not run (--skip-tests)" if args.skip_tests else run_cuda_tests()

    from transformers import AutoTokenizer

    from longserve.server.models import DEFAULT_MODEL, resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(DEFAULT_MODEL))
    model = build_model(shape, args.device, dtype)
    print(f"\n{'context':>8} {'batch':>6} {'plain tok/s':>12} {'1/4 rerope tok/s':>17} {'ratio':>6}", flush=True)
    for context in contexts:
        for batch in batches:
            needed = kv_bytes(shape, batch * context, dtype, planes=3)  # keys, values and ReRoPE's near keys
            if needed > kv_gib * 2**30:
                print(f"{context:>8} {batch:>6}   skipped: needs {needed / 2**30:.0f} GiB of KV cache (--kv-gib {kv_gib:g})")
                continue
            config = EngineConfig(model_path="", model_name="gpu-check", device=args.device, dtype=str(dtype).removeprefix("torch."),
                                  max_num_seqs=batch, max_model_len=context + args.tokens, kv_cache_memory=kv_gib,
                                  max_num_batched_tokens=max(2048, context))
            engine = NativeEngine(config, metrics=None, model=model, tokenizer=tokenizer)
            try:
                prompt_len = context - args.tokens
                plain = asyncio.run(output_rate(engine, batch, prompt_len, args.tokens, rerope_every=0))
                mixed = asyncio.run(output_rate(engine, batch, prompt_len, args.tokens, rerope_every=4))
            finally:
                engine.shutdown()
            print(f"{context:>8} {batch:>6} {plain:>12.1f} {mixed:>17.1f} {mixed / plain:>6.2f}", flush=True)
    print(f"\nCUDA tests: {tests}")
    return 1 if tests.startswith("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
