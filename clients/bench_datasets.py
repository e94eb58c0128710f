"""The request bodies `longserve bench` sends, built before the clock starts.

- random: words drawn with the seed, fitted through the server's /tokenize so
  each prompt is exactly --input-len tokens as the server counts them (chat:
  the whole templated conversation); --output-len tokens asked for.
- passkey: the long-context prompt of clients/prompts.py at --input-len tokens.
- nbce: --nbce-contexts documents of --input-len / n tokens, one hiding the
  passkey, sent as longserve's `contexts`.
- kgclue: few-shot questions answered under a trie constraint against the
  server's knowledge base --trie (register one with `longserve kgclue` first).
- file: JSON lines, one request body each (model, stream and usage added).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from longserve.clients.prompts import PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_QUESTION, passkey_prompt
from longserve.clients.server_client import Server

# Common words that most BPE vocabularies hold as one token after a space: a
# prompt of them grows by about one token per word, so fitting takes few tries.
WORDS = ("the of and to in is was for on that with as by at from his her they this had are but not have one all were "
         "when there which she their can been has more time will would about out many then them these some first "
         "water day into could long people other make than see only way may down know new work year").split()
DATASETS = ("random", "passkey", "nbce", "kgclue", "file")
FIT_TRIES = 12


@dataclass
class Item:
    body: dict  # the request body, without model and stream settings
    input_tokens: int | None  # the dataset's own count (exact for random)


def count_tokens(server: Server, endpoint: str, text: str) -> int:
    """Tokens the server will see for `text` as a prompt (completions) or one user message (chat)."""
    body = {"prompt": text} if endpoint == "completions" else {"messages": [{"role": "user", "content": text}]}
    return int(server.tokenize_body(body)["count"])


def fit_words(server: Server, endpoint: str, target: int, rng: random.Random) -> str:
    """Random words that come to exactly `target` tokens as the server counts them."""
    words = [rng.choice(WORDS) for _ in range(target)]
    size = target
    for _ in range(FIT_TRIES):
        text = " ".join(words[:size])
        count = count_tokens(server, endpoint, text)
        if count == target:
            return text
        size = max(1, size + (target - count))
        while size > len(words):
            words.append(rng.choice(WORDS))
    raise SystemExit(f"could not fit a prompt of exactly {target} tokens in {FIT_TRIES} tries (last: {count}); "
                     "is --input-len below the chat template's own length?")


def as_body(endpoint: str, prompt: str, output_len: int, **extra) -> dict:
    body = {"prompt": prompt} if endpoint == "completions" else {"messages": [{"role": "user", "content": prompt}]}
    return {**body, "max_tokens": output_len, **extra}


def build(args, server: Server) -> list[Item]:
    """args.num_prompts + args.warmup items of args.dataset."""
    rng = random.Random(args.seed)
    count = args.num_prompts + args.warmup
    if args.dataset == "kgclue":
        return kgclue_items(args, count)
    if args.dataset == "file":
        return file_items(args, count)
    sizes: dict = {}  # passkey, nbce: token sizes of the fixed parts, measured once
    items = []
    for _ in tqdm(range(count), desc=f"building {args.dataset} prompts", unit="prompt", file=sys.stderr):
        if args.dataset == "random":
            items.append(Item(as_body(args.endpoint, fit_words(server, args.endpoint, args.input_len, rng), args.output_len),
                              args.input_len))
        elif args.dataset == "passkey":
            prompt = passkey_prompt(server, args.input_len, rng.random(), str(rng.randint(10000, 99999)), sizes)
            items.append(Item(as_body(args.endpoint, prompt, args.output_len), None))
        else:
            items.append(nbce_item(args, server, rng, sizes))
    return items


def nbce_item(args, server: Server, rng: random.Random, sizes: dict) -> Item:
    from longserve.clients.nbce_eval import documents

    if "filler" not in sizes:
        sizes["filler"] = len(server.tokenize(PASSKEY_FILLER * 64)) / 64
    docs, _, _ = documents(args.nbce_contexts, args.input_len // args.nbce_contexts, sizes["filler"], rng)
    return Item(as_body(args.endpoint, (PASSKEY_INTRO + PASSKEY_QUESTION).strip(), args.output_len, contexts=docs), None)


def kgclue_items(args, count: int) -> list[Item]:
    from longserve.clients.kgclue import few_shot_prompt, read_questions

    if not args.trie:
        raise SystemExit("--dataset kgclue needs --trie NAME: a knowledge base registered on the server (see `longserve kgclue`)")
    questions = read_questions(Path(args.dataset_path or Path(__file__).parents[1] / "tests/data/kgclue/questions.jsonl"))
    shots, asked = questions[:4], questions[4:]
    return [Item(as_body(args.endpoint, few_shot_prompt(shots, asked[i % len(asked)]["question"]), args.output_len,
                         constraint={"trie": args.trie}), None) for i in range(count)]


def file_items(args, count: int) -> list[Item]:
    if not args.dataset_path:
        raise SystemExit("--dataset file needs --dataset-path: JSON lines, one request body each")
    bodies = []
    for number, line in enumerate(Path(args.dataset_path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                body = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{args.dataset_path}:{number}: not JSON: {exc}") from None
            if not isinstance(body, dict):
                raise SystemExit(f"{args.dataset_path}:{number}: expected a JSON object (a request body)")
            bodies.append(body)
    if not bodies:
        raise SystemExit(f"{args.dataset_path}: no request bodies")
    return [Item(dict(bodies[i % len(bodies)]), None) for i in range(count)]
