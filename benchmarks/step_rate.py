"""The native engine's step against the machine's own limits, and against an older revision side by side.

    python benchmarks/step_rate.py [--against REV] [--prompt 256] [--tokens 64] [--concurrency 1,8,32]

First the machine: the matmul peak (GFLOPS, 4096 x 4096 in the engine's dtype) and the memory bandwidth (a
1 GiB copy), and from them the two floors of a decode step: reading the weights once (what one row costs at
best) and the step's matmul time (what many rows cost at best). Then each case, in a child process per
revision (REV from a `git worktree`, so both run the same measuring code): output tokens per second over the
whole batch (prefill included), and the decode step's median time (the median gap between a sequence's
tokens). Cases: all rows plain at each concurrency, then the largest concurrency with a quarter of its rows on
ReRoPE (--rerope-window) and the rest plain. Every row decodes exactly --tokens tokens, greedy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from revisions import has_package, new_names_to_old  # benchmarks/, on the path when run as a script

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def machine_limits(dtype_name: str) -> dict:
    import torch

    from longserve.server.engine.native.loading import pick_dtype

    dtype = pick_dtype(dtype_name, torch.device("cpu"))
    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    torch.matmul(a, b)
    started = time.perf_counter()
    for _ in range(3):
        torch.matmul(a, b)
    gflops = 3 * 2 * 4096**3 / (time.perf_counter() - started) / 1e9
    source = torch.empty(2**30, dtype=torch.uint8).fill_(1)
    target = torch.empty_like(source)
    target.copy_(source)
    started = time.perf_counter()
    for _ in range(3):
        target.copy_(source)
    bandwidth = 3 * 2 * 2**30 / (time.perf_counter() - started) / 1e9  # read and write
    return {"dtype": str(dtype).removeprefix("torch."), "gflops": gflops, "bandwidth": bandwidth}


def run_cases(args) -> list[dict]:
    """In this process, with whatever `server` package is first on the path."""
    import asyncio

    from longserve.patches.rope import PositionSpec
    from longserve.server.engine.base import GenerationRequest, SamplingParams
    from longserve.server.engine.config import EngineConfig
    from longserve.server.engine.native.engine import NativeEngine
    from longserve.server.models import DEFAULT_MODEL, resolve

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    engine = NativeEngine(EngineConfig(model_path=str(resolve(DEFAULT_MODEL)), model_name=DEFAULT_MODEL, dtype=args.dtype,
                                       max_num_seqs=max(concurrencies), enable_prefix_caching=False, max_model_len=args.prompt + args.tokens + 8))
    ids = engine.tokenizer.encode(TEXT.read_text(encoding="utf-8")[: 8 * args.prompt * max(concurrencies)])
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    rerope = PositionSpec(type="rerope", window=args.rerope_window)

    async def one(name: str, index: int, position) -> list[float]:
        request = GenerationRequest(name, [ids[index * args.prompt : (index + 1) * args.prompt]], params)
        request.position = position
        stamps = []
        async for _ in engine.generate(request):
            stamps.append(time.perf_counter())
        return stamps

    async def case(concurrency: int, clipped: int) -> dict:
        started = time.perf_counter()
        stamps = await asyncio.gather(*(one(f"c{concurrency}-{clipped}-{i}-{time.time()}", i, rerope if i % 4 == 3 and clipped else None)
                                        for i in range(concurrency)))
        elapsed = time.perf_counter() - started
        gaps = [later - earlier for row in stamps for earlier, later in zip(row[1:], row[2:])]
        return {"concurrency": concurrency, "rerope_rows": clipped, "tok_s": concurrency * args.tokens / elapsed,
                "step_ms": 1000 * statistics.median(gaps)}

    async def all_cases() -> list[dict]:
        await case(2, 0)  # warm-up
        results = [await case(c, 0) for c in concurrencies]
        results.append(await case(max(concurrencies), max(concurrencies) // 4))
        return results

    try:
        results = asyncio.run(all_cases())
    finally:
        engine.shutdown()
    params_count = parameter_count(engine.runner.model.config)
    return [{**r, "weight_bytes": params_count * engine.dtype.itemsize, "params": params_count} for r in results]


def parameter_count(config) -> int:
    """From the config on the meta device: the engine may have released the model's plain weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # a tied head once: a step reads it whole, the embedding a row


def in_child(tree: Path, args) -> list[dict]:
    """run_cases in a fresh process whose `server` and `patches` come from `tree`."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--prompt", str(args.prompt), "--tokens",
               str(args.tokens), "--concurrency", args.concurrency, "--rerope-window", str(args.rerope_window),
               "--dtype", args.dtype]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the run in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="step_rate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", help="a git revision to run beside this tree")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rerope-window", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if not has_package(os.getcwd()):  # an older revision: its folders import as server, patches
            new_names_to_old()
        print(json.dumps(run_cases(args)))
        return
    sys.path.insert(0, str(ROOT))
    from longserve.server.engine.native.loading import speed_flags

    limits = machine_limits(args.dtype)
    print(f"step_rate: CPU flags {speed_flags()}; {limits['dtype']}; matmul peak {limits['gflops']:.0f} GFLOPS, "
          f"memory {limits['bandwidth']:.1f} GB/s; {args.prompt} tokens in, {args.tokens} out, greedy", flush=True)
    now = in_child(ROOT, args)
    then = None
    if args.against:
        with tempfile.TemporaryDirectory() as scratch:
            tree = Path(scratch) / "tree"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.against], check=True,
                           capture_output=True)
            try:
                then = in_child(tree, args)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    weights_ms = 1000 * now[0]["weight_bytes"] / (limits["bandwidth"] * 1e9)
    print(f"floors: reading the weights once {weights_ms:.1f} ms; matmul time of a step = 2 x {now[0]['params'] / 1e6:.0f}M "
          f"params x rows / peak")
    header = f"{'rows':>4} {'rerope':>6} {'tok/s':>8} {'step ms':>8} {'/ floor':>8}"
    print(header + (f" {'then tok/s':>10} {'then ms':>8} {'now/then':>8}" if then else ""))
    for index, row in enumerate(now):
        matmul_ms = 1000 * 2 * row["params"] * row["concurrency"] / (limits["gflops"] * 1e9)
        floor = max(weights_ms, matmul_ms)
        line = (f"{row['concurrency']:>4} {row['rerope_rows']:>6} {row['tok_s']:>8.1f} {row['step_ms']:>8.1f} "
                f"{row['step_ms'] / floor:>8.2f}")
        if then:
            old = then[index]
            line += f" {old['tok_s']:>10.1f} {old['step_ms']:>8.1f} {row['tok_s'] / old['tok_s']:>8.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
