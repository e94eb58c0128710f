"""Request bodies that compare longserve's trie constraint with vLLM's `structured_outputs` choice.

    python -m longserve.clients.choice_bodies --candidates 100,10000 --out results/choices

For each N it writes, into --out, N distinct candidates of three common words each and:
- trie-N.json: the body of POST /v1/tries registering them as the base "choices-N";
- registered-N.jsonl: requests constrained to that base;
- inline-N.jsonl: requests carrying the N candidates inline (`constraint.choices`);
- vllm-choice-N.jsonl: requests carrying them as vLLM's `structured_outputs: {"choice": [...]}`;
- plain.jsonl: the same prompt unconstrained.
Feed them to `longserve bench --dataset file --dataset-path FILE` against each server.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

from longserve.clients.bench_datasets import WORDS

PROMPT = "Pick one item from the catalogue and name it.\nItem:"
MAX_TOKENS = 16


def candidates(count: int, seed: int = 0) -> list[str]:
    combos = list(itertools.product(WORDS[:60], repeat=3))
    random.Random(seed).shuffle(combos)
    return [" ".join(words) for words in combos[:count]]


def write_jsonl(path: Path, body: dict) -> None:
    path.write_text(json.dumps(body) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", default="100,10000", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--out", type=Path, default=Path("results/choices"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    write_jsonl(args.out / "plain.jsonl", base)
    for count in args.candidates:
        keys = candidates(count)
        (args.out / f"trie-{count}.json").write_text(json.dumps(
            {"name": f"choices-{count}", "lead": " ", "entries": [{"key": key, "value": i} for i, key in enumerate(keys)]}))
        write_jsonl(args.out / f"registered-{count}.jsonl", {**base, "constraint": {"trie": f"choices-{count}"}})
        write_jsonl(args.out / f"inline-{count}.jsonl", {**base, "constraint": {"choices": keys, "lead": " "}})
        write_jsonl(args.out / f"vllm-choice-{count}.jsonl", {**base, "structured_outputs": {"choice": [" " + k for k in keys]}})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
