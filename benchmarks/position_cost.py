"""What a position setting costs: prefill time, decode time per token and peak memory,
on the same long prompts, one setting against another.

    python benchmarks/position_cost.py --lengths 8k,16k \\
        --positions '[{"type": "rope"}, {"type": "rerope", "window": 2048, "logn": true}]'

Each (setting, length) runs in a fresh child process, so its peak memory is
its own: the child's peak resident set on CPU, or torch's peak allocation on
CUDA. The prompt is the start of --text cut to the length; prefill time is
the time to the first token (chunked prefill, as the server runs it), decode
time is the mean time per token over the next --tokens tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from longserve.patches.rope import PositionSpec

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"  # beside the checkout


def measure(model: str, text: Path, length: int, spec: PositionSpec, tokens: int) -> dict:
    """In this process: one prompt of `length` tokens under `spec`."""
    from longserve.server.engine.base import GenerationRequest, SamplingParams
    from longserve.server.engine.config import EngineConfig
    from longserve.server.engine.native.engine import NativeEngine
    from longserve.server.models import resolve

    engine = NativeEngine(EngineConfig(model_path=str(resolve(model)), model_name=model, max_num_seqs=1,
                                       max_model_len=length + tokens + 1, position=spec))
    ids = engine.tokenizer.encode(text.read_text(encoding="utf-8")[: length * 8])[:length]
    if len(ids) < length:
        raise SystemExit(f"{text} has only {len(ids)} tokens; give a longer --text")
    params = SamplingParams(max_tokens=tokens + 1, temperature=0.0, ignore_eos=True)
    stamps = []

    async def run():
        async for delta in engine.generate(GenerationRequest("cost", [ids], params)):
            stamps.extend([time.perf_counter()] * len(delta.token_ids))

    started = time.perf_counter()
    asyncio.run(run())
    engine.shutdown()
    if engine.device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {
        "prefill_s": stamps[0] - started,
        "decode_ms_per_token": 1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1),
        "peak_mib": peak_mib,
    }


def label(spec: PositionSpec) -> str:
    return " ".join(f"{k}={v}" for k, v in spec.describe().items() if v not in (None, False)).replace("type=", "")


def main() -> None:
    from longserve.clients.prompts import length_label, parse_lengths

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--lengths", type=parse_lengths, default=parse_lengths("8k,16k"))
    parser.add_argument("--positions", type=json.loads, default=[{"type": "rope"}, {"type": "rerope", "logn": True}])
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens timed after the first")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement, printed as JSON for the parent
        spec, length = PositionSpec(**json.loads(args.child)), args.lengths[0]
        print(json.dumps(measure(args.model, args.text, length, spec, args.tokens)))
        return

    from longserve.server.engine.native.loading import speed_flags

    print(f"position_cost: CPU flags {speed_flags()}; dtype auto", file=sys.stderr, flush=True)
    specs = [PositionSpec(**p) for p in args.positions]
    rows = []
    for length in args.lengths:
        for spec in specs:
            command = [sys.executable, __file__, "--child", spec.model_dump_json(), "--model", args.model,
                       "--text", str(args.text), "--lengths", str(length), "--tokens", str(args.tokens)]
            print(f"measuring {label(spec)} at {length_label(length)} ...", file=sys.stderr, flush=True)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr.strip().splitlines()[-1])
            rows.append((length, spec, json.loads(done.stdout.strip().splitlines()[-1])))

    print(f"{'length':>7}  {'setting':<34}{'prefill s':>10}{'x first':>8}{'decode ms/tok':>15}{'x first':>8}{'peak MiB':>10}")
    for length, spec, cost in rows:
        first = next(c for l, _, c in rows if l == length)
        print(f"{length_label(length):>7}  {label(spec):<34}{cost['prefill_s']:>10.1f}{cost['prefill_s'] / first['prefill_s']:>8.2f}"
              f"{cost['decode_ms_per_token']:>15.1f}{cost['decode_ms_per_token'] / first['decode_ms_per_token']:>8.2f}"
              f"{cost['peak_mib']:>10.0f}")


if __name__ == "__main__":
    main()
