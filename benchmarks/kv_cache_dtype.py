"""The 8-bit KV cache (--kv-cache-dtype) against the unquantized one, side by side, bundled model.

    python benchmarks/kv_cache_dtype.py rate [--dtypes auto/gathered,auto,int8,fp8] [--contexts 2k,16k] [--concurrency 1,32]
    python benchmarks/kv_cache_dtype.py loss [--dtypes auto,int8,fp8,fp8_e5m2] [--contexts 4k,8k,16k]
    python benchmarks/kv_cache_dtype.py fit [--memory 2]
    python benchmarks/kv_cache_dtype.py rotation [--context 4096]

rate: decode speed with a long context. Every row of a case shares one prompt of the context's length but its
last 16 tokens (the shared part comes from the prefix cache, prefilled once before the case), then decodes
--tokens tokens, greedy; the figure is the median gap between a row's tokens (TPOT) and rows / TPOT. Each
dtype runs in a child process of its own, in turn, cases in the same order. A dtype written "auto/gathered"
runs with the paged decode kernel off (LONGSERVE_PAGED_DECODE=0): decode keys gathered first, as before it.

loss: the mean loss of --score-last tokens of tinyshakespeare.txt with the context's length before them, the
scored tokens ending at the largest context (the loss table's measure, `longserve eval loss`, docs/positions.md), under ReRoPE w4096 + log-n, and the mean KL divergence of
each position's next-token distribution from the unquantized cache's, in nats.

fit: the longest prompt (prompt + answer) that --kv-cache-memory GiB holds with each dtype, as the engine sizes
its pool (kv_cache.sized_pool), for the bundled model and a Llama-3-8B shape.

rotation: whether keys are better quantized before rotation or after it. Keys and queries of every layer of the
bundled model on the text; the error of the attention scores q.k when keys are quantized after rotation (what
the cache stores) and before it (rotated back at read time), relative to the scores' spread, and what turning
the keys at read time would cost: one rotation of every key a decode group reads.

CPU flags and the machine's memory bandwidth are printed first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SUFFIX = 16  # tokens of its own at the end of each row's prompt


def tokens_of(text: str) -> int:
    return int(float(text[:-1]) * 1024) if text[-1] in "kK" else int(text)


def header() -> None:
    import torch

    from longserve.server.engine.native.loading import speed_flags
    from step_rate import machine_limits  # benchmarks/, on the path when run as a script

    limits = machine_limits("auto")
    print(f"CPU flags: {speed_flags()}; {torch.get_num_threads()} threads; {limits['dtype']} matmul peak "
          f"{limits['gflops']:.0f} GFLOPS; memory copy {limits['bandwidth']:.1f} GB/s (read + write)", flush=True)


def engine_for(cache_dtype: str, max_model_len: int, max_num_seqs: int, position=None, prefix_caching: bool = True):
    from longserve.patches.rope import PositionSpec
    from longserve.server.engine.config import EngineConfig
    from longserve.server.engine.native.engine import NativeEngine
    from longserve.server.models import DEFAULT_MODEL, resolve

    config = EngineConfig(model_path=str(resolve(DEFAULT_MODEL)), model_name=DEFAULT_MODEL, max_num_seqs=max_num_seqs,
                          max_model_len=max_model_len, kv_cache_memory=4.0, kv_cache_dtype=cache_dtype,
                          enable_prefix_caching=prefix_caching, position=position or PositionSpec(),
                          request_rerope=False, max_num_batched_tokens=2048)
    return NativeEngine(config)


def text_ids(tokenizer, count: int) -> list[int]:
    """The first `count` tokens of the text, as `longserve eval loss` takes them."""
    text = TEXT.read_text(encoding="utf-8")
    return tokenizer.encode(text[: 12 * count])[:count]


# ---- rate ---------------------------------------------------------------------------------------------------------

def rate_child(args) -> None:
    from longserve.server.engine.base import GenerationRequest, SamplingParams

    contexts = [tokens_of(c) for c in args.contexts.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    engine = engine_for(args.only.partition("/")[0], max(contexts) + args.tokens + 16, max(concurrencies))
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)

    async def row(name: str, ids: list[int]) -> list[float]:
        stamps = []
        async for delta in engine.generate(GenerationRequest(name, [ids], params)):
            stamps += [time.perf_counter()] * len(delta.token_ids)
        return stamps

    figures = []
    for context in contexts:
        shared = text_ids(engine.tokenizer, context - SUFFIX)
        asyncio.run(row(f"warm-{context}", shared + list(range(1000, 1000 + SUFFIX))))  # prefills the shared part once
        for rows in concurrencies:
            prompts = [shared + list(range(2000 + 100 * r, 2000 + 100 * r + SUFFIX)) for r in range(rows)]

            async def case():
                return await asyncio.gather(*(row(f"r{context}-{rows}-{r}", ids) for r, ids in enumerate(prompts)))

            stamps = asyncio.run(case())
            gaps = [later - earlier for row_stamps in stamps for earlier, later in zip(row_stamps[1:-1], row_stamps[2:])]
            tpot = statistics.median(gaps)
            figures.append({"dtype": args.only, "context": context, "rows": rows, "tpot_ms": tpot * 1e3,
                            "tokens_per_s": rows / tpot})
    engine.shutdown()
    print(json.dumps(figures), flush=True)


def in_child(command: str, cache_dtype: str, *options: str):
    """This script's `command` for one cache dtype in a process of its own: the JSON it prints last. "/gathered"
    after the dtype: with the paged decode kernel off."""
    gathered = {"LONGSERVE_PAGED_DECODE": "0"} if cache_dtype.endswith("/gathered") else {}
    child = subprocess.run([sys.executable, __file__, command, "--only", cache_dtype, *options], capture_output=True,
                           text=True, env={**os.environ, **gathered})
    if child.returncode:
        sys.exit(f"{cache_dtype}: {child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def rate(args) -> None:
    results = {}
    for cache_dtype in args.dtypes.split(","):
        options = ("--contexts", args.contexts, "--concurrency", args.concurrency, "--tokens", str(args.tokens))
        for figure in in_child("rate", cache_dtype, *options):
            results[figure["context"], figure["rows"], cache_dtype] = figure
        print(f"  {cache_dtype} done", flush=True)
    dtypes = args.dtypes.split(",")
    base = "auto" if "auto" in dtypes else dtypes[0]  # ratios against the unquantized cache as the engine runs it
    against = [(d, dtypes[0]) for d in dtypes[1:]] + [(d, base) for d in dtypes if base != dtypes[0] and d not in (dtypes[0], base)]
    print("| context | rows | " + " | ".join(f"{d} TPOT ms | {d} tok/s" for d in dtypes) + " | "
          + " | ".join(f"{d} / {b}" for d, b in against) + " |")
    print("| ---: " * (2 + 2 * len(dtypes) + len(against)) + "|")
    for context, rows in sorted({(c, r) for c, r, _ in results}):
        cells = {d: results[context, rows, d] for d in dtypes}
        speeds = [f"{cells[d]['tpot_ms']:.1f} | {cells[d]['tokens_per_s']:.1f}" for d in dtypes]
        ratios = [f"{cells[d]['tokens_per_s'] / cells[b]['tokens_per_s']:.2f}" for d, b in against]
        print(f"| {context} | {rows} | " + " | ".join(speeds + ratios) + " |")


# ---- loss ---------------------------------------------------------------------------------------------------------

def loss_child(args) -> None:
    import torch

    from longserve.patches.rope import PositionSpec
    from longserve.server.engine.base import GenerationRequest, SamplingParams
    from longserve.server.engine.native import engine as engine_module

    contexts = [tokens_of(c) for c in args.contexts.split(",")]
    position = PositionSpec(type="rerope", window=4096, logn=True)
    engine = engine_for(args.only, max(contexts) + 8, 1, position, prefix_caching=False)
    kept: list[torch.Tensor] = []
    score_last = args.score_last
    real = engine_module.prompt_logprobs

    def keep(logits, next_tokens, top_k):  # the full distributions of the last score_last positions
        rows = logits[: len(next_tokens)].float().log_softmax(dim=-1)
        kept.append(rows[-score_last:].clone())
        while sum(len(part) for part in kept) - len(kept[0]) >= score_last:
            kept.pop(0)
        return real(logits, next_tokens, top_k)

    engine_module.prompt_logprobs = keep
    out = {}
    text = text_ids(engine.tokenizer, max(contexts))
    for context in contexts:
        ids = text[len(text) - context:]  # every window ends on the same scored tokens, as in `longserve eval loss`
        kept.clear()

        async def score():
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
            async for delta in engine.generate(GenerationRequest(f"loss-{context}", [ids], params)):
                assert delta.error is None, delta.error

        started = time.perf_counter()
        asyncio.run(score())
        rows = torch.cat(kept)[-score_last:]
        targets = torch.tensor(ids[-score_last:])
        path = Path(args.scratch) / f"{args.only}-{context}.pt"
        torch.save(rows, path)
        out[context] = {"loss": -rows.gather(1, targets.unsqueeze(1)).mean().item(), "file": str(path),
                        "seconds": time.perf_counter() - started}
    engine.shutdown()
    print(json.dumps(out), flush=True)


def loss(args) -> None:
    import tempfile

    import torch

    dtypes = args.dtypes.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for cache_dtype in dtypes:
            figures = in_child("loss", cache_dtype, "--contexts", args.contexts, "--score-last", str(args.score_last),
                               "--scratch", scratch)
            results[cache_dtype] = {int(k): v for k, v in figures.items()}
            print(f"  {cache_dtype} done ({sum(v['seconds'] for v in results[cache_dtype].values()):.0f} s)", flush=True)
        contexts = sorted(results[dtypes[0]])
        print("| cache | " + " | ".join(f"loss {c}" for c in contexts) + " | " + " | ".join(f"vs {dtypes[0]} {c}" for c in contexts)
              + " | " + " | ".join(f"KL {c} (nats)" for c in contexts) + " |")
        print("| --- " + "| ---: " * (3 * len(contexts)) + "|")
        for cache_dtype in dtypes:
            losses, changes, kls = [], [], []
            for context in contexts:
                base, this = results[dtypes[0]][context], results[cache_dtype][context]
                losses.append(f"{this['loss']:.4f}")
                changes.append(f"{(this['loss'] / base['loss'] - 1) * 100:+.2f} %")
                p, q = torch.load(base["file"]), torch.load(this["file"])
                kls.append(f"{(p.exp() * (p - q)).sum(-1).mean().item():.5f}")
            print(f"| {cache_dtype} | " + " | ".join(losses + changes + kls) + " |")


# ---- fit ----------------------------------------------------------------------------------------------------------

def fit(args) -> None:
    import torch

    from longserve.patches.model_facts import ModelFacts
    from longserve.server.engine.native.kv_cache import sized_pool
    from longserve.server.engine.native.kv_quant import cache_format

    from transformers import AutoConfig

    from gpu_check import LLAMA3_8B  # benchmarks/, on the path when run as a script
    from longserve.server.models import DEFAULT_MODEL, resolve

    shapes = {"bundled": ModelFacts.of(AutoConfig.from_pretrained(str(resolve(DEFAULT_MODEL)))),
              "Llama-3-8B shape": ModelFacts.of(AutoConfig.for_model("llama", **LLAMA3_8B))}
    print(f"--kv-cache-memory {args.memory:g}: the longest sequence (prompt + answer) the pool holds")
    print("| model | model dtype | planes | auto | int8 | fp8 | int8 / auto |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, facts in shapes.items():
        name = f"{label} ({facts.num_layers} layers, {facts.num_kv_heads} KV heads x {facts.head_dim})"
        for dtype in (torch.float32, torch.bfloat16):
            for clipped in (False, True):
                tokens = [sized_pool(facts, dtype, torch.device("cpu"), args.memory, 16, near_keys=clipped,
                                     cache=cache_format(c)).num_tokens for c in ("auto", "int8", "fp8")]
                planes = "3 (ReRoPE)" if clipped else "2"
                print(f"| {name} | {str(dtype).removeprefix('torch.')} | {planes} | {tokens[0]:,} | {tokens[1]:,} | "
                      f"{tokens[2]:,} | {tokens[1] / tokens[0]:.2f} |")


# ---- rotation -----------------------------------------------------------------------------------------------------

def rotation(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longserve.patches.rope import cos_sin, rotate
    from longserve.server.engine.native.kv_quant import cache_format, dequantize, quantize
    from longserve.server.models import DEFAULT_MODEL, resolve

    path = str(resolve(DEFAULT_MODEL))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = text_ids(tokenizer, args.context)
    captured = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        for name in ("q_proj", "k_proj"):
            hooks.append(getattr(attention, name).register_forward_hook(
                lambda module, inputs, output, key=(index, name): captured.__setitem__(key, output[0].detach())))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    inv_freq = model.model.rotary_emb.inv_freq.float()
    positions = torch.arange(len(ids))
    cos, sin = cos_sin(inv_freq, positions)
    cos, sin = cos[:, None], sin[:, None]
    sample = torch.arange(len(ids) - 64, len(ids))  # the last 64 queries, over every key
    print(f"{len(ids)} tokens of text, {len(model.model.layers)} layers; score error / score standard deviation, "
          "mean over layers (worst layer)")
    print("| cache | keys quantized after rotation (stored) | before rotation (turned at read) |")
    print("| --- | ---: | ---: |")
    for name in ("int8", "fp8", "fp8_e5m2"):
        cache = cache_format(name)
        errors = {"after": [], "before": []}
        for index in range(len(model.model.layers)):
            q = captured[index, "q_proj"].view(len(ids), -1, head_dim)
            k = captured[index, "k_proj"].view(len(ids), -1, head_dim)
            groups = q.shape[1] // k.shape[1]
            turned_q = rotate(q, cos, sin)[sample]
            turned_k = rotate(k, cos, sin)
            after = dequantize(*quantize(turned_k, cache, torch.float16), cache, torch.float32)
            before = rotate(dequantize(*quantize(k, cache, torch.float16), cache, torch.float32), cos, sin)
            exact = torch.einsum("qhd,khd->hqk", turned_q, turned_k.repeat_interleave(groups, 1))
            spread = exact.std()
            for form, keys in (("after", after), ("before", before)):
                scores = torch.einsum("qhd,khd->hqk", turned_q, keys.repeat_interleave(groups, 1))
                errors[form].append(((scores - exact).abs().mean() / spread).item())
        cells = [f"{statistics.mean(errors[f]):.5f} ({max(errors[f]):.5f})" for f in ("after", "before")]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    kv_heads, keys = config.num_key_value_heads, 32 * 2048
    gathered = torch.randn(kv_heads, keys, head_dim, dtype=torch.bfloat16)
    key_cos, key_sin = torch.randn(keys, head_dim).to(torch.bfloat16), torch.randn(keys, head_dim).to(torch.bfloat16)
    codes, scales = quantize(gathered, cache_format("int8"), torch.bfloat16)

    def timed(work) -> float:
        work()
        started = time.perf_counter()
        for _ in range(10):
            work()
        return (time.perf_counter() - started) / 10 * 1e3

    read_back = timed(lambda: dequantize(codes, scales, cache_format("int8"), torch.bfloat16))
    turned = timed(lambda: rotate(gathered, key_cos, key_sin))
    print(f"a decode group of 32 rows x 2,048 keys, one plane, bfloat16: reading int8 back {read_back:.2f} ms; "
          f"turning the keys at read time would add {turned:.2f} ms, per layer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rate_args = sub.add_parser("rate")
    rate_args.add_argument("--dtypes", default="auto/gathered,auto,int8,fp8")
    rate_args.add_argument("--contexts", default="2k,16k")
    rate_args.add_argument("--concurrency", default="1,32")
    rate_args.add_argument("--tokens", type=int, default=16)
    rate_args.add_argument("--only", help=argparse.SUPPRESS)
    loss_args = sub.add_parser("loss")
    loss_args.add_argument("--dtypes", default="auto,int8,fp8,fp8_e5m2")
    loss_args.add_argument("--contexts", default="4k,8k,16k")
    loss_args.add_argument("--score-last", type=int, default=1024)
    loss_args.add_argument("--only", help=argparse.SUPPRESS)
    loss_args.add_argument("--scratch", help=argparse.SUPPRESS)
    fit_args = sub.add_parser("fit")
    fit_args.add_argument("--memory", type=float, default=2.0)
    rotation_args = sub.add_parser("rotation")
    rotation_args.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()
    if getattr(args, "only", None):
        {"rate": rate_child, "loss": loss_child}[args.command](args)
        return
    header()
    {"rate": rate, "loss": loss, "fit": fit, "rotation": rotation}[args.command](args)


if __name__ == "__main__":
    main()
