"""Structured outputs: what a grammar costs per step, xgrammar against llguidance, and in the native engine.

    python benchmarks/structured.py [--model smollm2-135m-instruct] [--batches 1,16] [--tokens 96]

1. The grammar libraries alone, on one medium JSON schema (20 properties,
   nested objects, enums, bounded arrays and strings): compile time, then the
   mean time to fill one bitmask row and take one token, along 20 walks of
   random allowed tokens.
2. The native engine on the bundled model, in one run: the unconstrained TPOT
   of B sequences decoded together, and what the engine adds to each such
   step under the schema: `mask_logits` over the B rows (every row's bitmask,
   applied in one op) and each row taking its token, with B matchers walking
   random allowed tokens. The overhead is the second over the first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        **{f"field_{i}": {"type": "string", "maxLength": 8} for i in range(8)},
        "status": {"type": "string", "enum": ["new", "open", "closed"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "ratio": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                   "email": {"type": "string", "maxLength": 20},
                                                   "level": {"type": "integer", "minimum": 1, "maximum": 5}},
                  "required": ["name", "level"], "additionalProperties": False},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "notes": {"type": "string", "maxLength": 16},
        "priority": {"type": "integer", "minimum": 1, "maximum": 3},
    },
    "required": ["field_0", "status", "count", "active", "owner", "address"],
    "additionalProperties": False,
}
WALKS = 20


def walk_cost(new_matcher, fill, take, stopped, vocab: int, bitmask: torch.Tensor) -> float:
    """Mean seconds to fill one bitmask row and take one token, along WALKS walks of random allowed tokens."""
    rng, steps, spent = random.Random(0), 0, 0.0
    for _ in range(WALKS):
        matcher = new_matcher()
        while not stopped(matcher):
            started = time.perf_counter()
            fill(matcher, bitmask)
            spent += time.perf_counter() - started
            token = rng.choice(allowed_ids(bitmask[0], vocab))
            started = time.perf_counter()
            take(matcher, token)
            spent += time.perf_counter() - started
            steps += 1
    return spent / steps


def xgrammar_cost(tokenizer, vocab: int) -> tuple[float, float]:
    import xgrammar

    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab), cache_enabled=False)
    started = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compiled = time.perf_counter() - started
    per_token = walk_cost(lambda: xgrammar.GrammarMatcher(grammar), lambda m, b: m.fill_next_token_bitmask(b, 0),
                          lambda m, t: m.accept_token(t), lambda m: m.is_terminated(), vocab,
                          xgrammar.allocate_token_bitmask(1, vocab))
    return compiled, per_token


def llguidance_cost(tokenizer, vocab: int) -> tuple[float, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    llguidance.LLMatcher(lltokenizer, grammar)
    compiled = time.perf_counter() - started
    per_token = walk_cost(lambda: llguidance.LLMatcher(lltokenizer, grammar),
                          lambda m, b: llguidance.torch.fill_next_token_bitmask(m, b, 0),
                          lambda m, t: m.consume_token(t), lambda m: m.is_stopped(), vocab,
                          llguidance.torch.allocate_token_bitmask(1, vocab))
    return compiled, per_token


def allowed_ids(row: torch.Tensor, vocab: int) -> list[int]:
    bits = (row.view(-1, 1) >> torch.arange(32, dtype=torch.int32)) & 1
    return torch.nonzero(bits.flatten()[:vocab]).flatten().tolist()


async def plain_tpot(engine, batch: int, tokens: int) -> float:
    """Mean time per output token after the first, over `batch` unconstrained sequences decoded together."""
    from longserve.server.engine.base import GenerationRequest, SamplingParams

    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Describe a ticket as JSON."}],
                                                add_generation_prompt=True, tokenize=False)
    prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(max_tokens=tokens, temperature=1.0, ignore_eos=True, seed=0)
    first, last, counts = {}, {}, {}
    async for delta in engine.generate(GenerationRequest(f"plain-{batch}-{tokens}", [prompt], params, n=batch)):
        now = time.perf_counter()
        first.setdefault(delta.index, now)
        last[delta.index], counts[delta.index] = now, delta.completion_tokens
    gaps = [(last[i] - first[i]) / (counts[i] - 1) for i in first if counts[i] > 1]
    return sum(gaps) / len(gaps)


def mask_step(compiled, batch: int, vocab: int, steps: int = 200) -> float:
    """Mean seconds the engine adds to one step of `batch` rows under the grammar: mask_logits, then every row
    taking a random allowed token (a finished row starts again)."""
    from longserve.server.engine.native.constraint import GrammarState, mask_logits

    rng = random.Random(0)
    states = [GrammarState(compiled) for _ in range(batch)]
    spent = 0.0
    for _ in range(steps):
        logits = torch.zeros(batch, vocab)
        started = time.perf_counter()
        mask_logits(logits, states)
        spent += time.perf_counter() - started
        tokens = [rng.choice(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in logits]
        started = time.perf_counter()
        done = [state.advance(token) for state, token in zip(states, tokens)]
        spent += time.perf_counter() - started
        states = [GrammarState(compiled) if finished else state for state, finished in zip(states, done)]
    return spent / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--tokens", type=int, default=96, help="the unconstrained run's output length")
    args = parser.parse_args()
    from longserve.server.engine.base import GrammarSpec
    from longserve.server.engine.config import EngineConfig
    from longserve.server.engine.native.engine import NativeEngine
    from longserve.server.extensions.grammar_compile import compile_spec, grammar_compiler
    from longserve.server.models import resolve

    batches = [int(b) for b in args.batches.split(",")]
    engine = NativeEngine(EngineConfig(model_path=str(resolve(args.model)), model_name=args.model, max_num_seqs=max(batches)))
    try:
        print("| library | compile | fill + take per token |\n| --- | ---: | ---: |")
        for name, measure in (("xgrammar", xgrammar_cost), ("llguidance", llguidance_cost)):
            compiled, per_token = measure(engine.tokenizer, engine.vocab_size)
            print(f"| {name} | {compiled * 1000:.1f} ms | {per_token * 1e6:.0f} us |")
        compiler = grammar_compiler(engine.tokenizer, engine.vocab_size, 2**26)
        spec = GrammarSpec("json", SCHEMA, compile_spec(compiler, GrammarSpec("json", SCHEMA)))
        print("\n| batch | TPOT unconstrained | added per step under the schema | overhead |\n| ---: | ---: | ---: | ---: |")
        for batch in batches:
            asyncio.run(plain_tpot(engine, batch, 8))  # warm-up
            plain = asyncio.run(plain_tpot(engine, batch, args.tokens))
            added = mask_step(spec.compiled, batch, engine.vocab_size)
            print(f"| {batch} | {plain * 1000:.1f} ms | {added * 1000:.2f} ms | {100 * added / plain:.1f} % |")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
