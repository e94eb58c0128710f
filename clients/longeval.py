"""Long-context evaluation against any OpenAI-compatible server.

    longserve eval passkey --base-url URL --lengths 4k,8k,16k --depths 0.1,0.5,0.9 --trials 3
    longserve eval loss --base-url URL --text FILE --contexts 2k,4k,8k,16k --score-last 1024
    longserve eval ruler --base-url URL --lengths 4k,8k,16k --samples 10 (clients/ruler.py)

passkey: a key hidden at a depth in filler text (patches/README.md, section 4); a trial
passes when the key appears in the first 10 generated tokens.
loss: mean negative log-likelihood of the same final N tokens of a text while
the context before them grows; scores come from /v1/completions with
echo + logprobs.

`--positions` (a JSON list of position settings) repeats the evaluation for
each, sent per request as the `position` field: a longserve extension. Leave
it out to evaluate whatever the server is configured with.

Each run prints a table and writes JSON and a PNG into --out. Ctrl-C stops it
early and still writes what finished ("interrupted": true; exit status 130).
`longserve eval table FILE...` prints one table from several such files
(clients/eval_table.py), for a sweep run in pieces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from longserve.clients.eval_table import add_table_args, run_table, table_for
from longserve.clients.prompts import ANSWER_TOKENS, length_label, parse_lengths, passkey_prompt, position_label
from longserve.clients.ruler_tasks import TASKS
from longserve.clients.server_client import Server

METHODS = ("nbce", "concat", "concat-scaled", "truncate")  # clients/nbce_eval.py

# ---- passkey -------------------------------------------------------------------


def run_passkey(server: Server, lengths: list[int], depths: list[float], trials: int, positions: list, seed: int) -> dict:
    rng = random.Random(seed)
    keys = {(length, depth, t): str(rng.randint(10000, 99999)) for length in lengths for depth in depths for t in range(trials)}
    sizes: dict = {}
    records = []
    progress = tqdm(total=len(positions) * len(keys), desc="passkey", unit="prompt")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the run; what finished is kept
        for position in positions:
            for (length, depth, trial), key in keys.items():
                # leave room for the answer inside the length
                prompt = passkey_prompt(server, length - ANSWER_TOKENS - 8, depth, key, sizes)
                started = time.perf_counter()
                try:
                    reply = server.complete(prompt, position, max_tokens=ANSWER_TOKENS)
                    answer, prompt_tokens, error = reply["choices"][0]["text"], reply["usage"]["prompt_tokens"], None
                except (RuntimeError, httpx.HTTPError) as exc:
                    answer, prompt_tokens, error = "", None, str(exc)
                records.append(
                    {
                        "method": position_label(position), "position": position, "length": length, "depth": depth,
                        "trial": trial, "key": key, "answer": answer, "found": key in answer, "prompt_tokens": prompt_tokens,
                        "seconds": round(time.perf_counter() - started, 2), "error": error,
                    }
                )
                progress.set_postfix(method=position_label(position), length=length_label(length), found=key in answer)
                progress.update()
    progress.close()
    return {"kind": "passkey", "interrupted": len(records) < progress.total, "model": server.model, "lengths": lengths,
            "depths": depths, "trials": trials, "records": records}


# ---- loss at length ------------------------------------------------------------


def text_tokens(server: Server, path: Path, needed: int) -> list[int]:
    """At least `needed` tokens from the start of the text file."""
    text = path.read_text(encoding="utf-8")
    chars = needed * 6
    while True:
        tokens = server.tokenize(text[:chars])
        if len(tokens) >= needed or chars >= len(text):
            break
        chars *= 2
    if len(tokens) < needed:
        raise SystemExit(f"{path} has only {len(tokens)} tokens; the largest context needs {needed}")
    return tokens[:needed]


def run_loss(server: Server, text: Path, contexts: list[int], score_last: int, positions: list) -> dict:
    if min(contexts) <= score_last:
        raise SystemExit(f"every context must be longer than --score-last {score_last}")
    tokens = text_tokens(server, text, max(contexts))
    records = []
    answer_tokens = [0]  # OpenAI's echo scoring asks for no new token; servers that insist get one
    progress = tqdm(total=len(positions) * len(contexts), desc="loss", unit="context")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the run; what finished is kept
        for position in positions:
            for context in contexts:
                window = tokens[len(tokens) - context :]  # every window ends on the same scored tokens
                started = time.perf_counter()
                try:
                    reply = score_prompt(server, window, position, answer_tokens)
                    scores = reply["choices"][0]["logprobs"]["token_logprobs"][:context]
                    scored = scores[context - score_last :]
                    loss, error = -sum(scored) / len(scored), None
                except (RuntimeError, httpx.HTTPError, TypeError, KeyError) as exc:
                    loss, error = None, str(exc)
                records.append(
                    {"method": position_label(position), "position": position, "context": context, "loss": loss,
                     "seconds": round(time.perf_counter() - started, 2), "error": error}
                )
                progress.set_postfix(method=position_label(position), context=length_label(context), loss=loss)
                progress.update()
    progress.close()
    return {"kind": "loss", "interrupted": len(records) < progress.total, "model": server.model, "text": str(text),
            "contexts": contexts, "score_last": score_last, "records": records}


def score_prompt(server: Server, window: list[int], position: dict | None, answer_tokens: list[int]) -> dict:
    """Completion with echo + logprobs; retries once with max_tokens 1 where 0 is refused."""
    try:
        return server.complete(window, position, max_tokens=answer_tokens[0], echo=True, logprobs=0)
    except RuntimeError as exc:
        if answer_tokens[0] != 0 or "HTTP 400" not in str(exc) or "max_tokens" not in str(exc):
            raise
        answer_tokens[0] = 1
        return server.complete(window, position, max_tokens=1, echo=True, logprobs=0)


# ---- command line ----------------------------------------------------------------


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", required=True)
    helps = {"passkey": "passkey retrieval by length and depth", "loss": "loss of a text's last tokens as context grows",
             "nbce": "passkey in one of n documents: NBCE, one long prompt, truncation",
             "ruler": "RULER's synthetic tasks (needles, variable tracking, word extraction) by length"}
    for kind, text in helps.items():
        sub = kinds.add_parser(kind, help=text)
        sub.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
        sub.add_argument("--model", help="model name (default: the server's first model)")
        sub.add_argument("--api-key", help="bearer key, if the server wants one")
        if kind != "nbce":
            sub.add_argument("--positions", type=json.loads, help="JSON list of position settings to compare (longserve only)")
        sub.add_argument("--out", type=Path, default=Path("results"), help="directory for the JSON and PNG (default results/)")
        sub.add_argument("--name", help="file name stem (default: the kind and a timestamp)")
        if kind == "ruler":
            sub.add_argument("--lengths", type=parse_lengths, default=parse_lengths("4k,8k"))
            sub.add_argument("--tasks", type=lambda t: [x.strip() for x in t.split(",") if x.strip()], default=list(TASKS),
                             help=f"comma-separated subset of {','.join(TASKS)}")
            sub.add_argument("--samples", type=int, default=10, help="samples per task and length")
            sub.add_argument("--seed", type=int, default=0)
        elif kind == "passkey":
            sub.add_argument("--lengths", type=parse_lengths, default=parse_lengths("4k,8k"))
            sub.add_argument("--depths", type=lambda t: [float(x) for x in t.split(",")], default=[0.1, 0.5, 0.9])
            sub.add_argument("--trials", type=int, default=3)
            sub.add_argument("--seed", type=int, default=0)
        elif kind == "nbce":
            sub.add_argument("--docs", type=lambda t: [int(x) for x in t.split(",")], default=[4, 8], help="document counts n")
            sub.add_argument("--trials", type=int, default=5)
            sub.add_argument("--doc-tokens", type=int, default=1536, help="filler tokens per document")
            sub.add_argument("--truncate", type=int, default=7168, help="tokens kept by the truncation method")
            sub.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
            sub.add_argument("--scaled-position", type=json.loads, default={"type": "dynamic", "factor": 2},
                             help="position setting for concat-scaled (JSON)")
            sub.add_argument("--seed", type=int, default=0)
            sub.add_argument("--first-trial", type=int, default=0,
                             help="skip trials before this one (0-based), e.g. to finish a cut run with the same documents")
        else:
            sub.add_argument("--text", type=Path, required=True, help="a long UTF-8 text file")
            sub.add_argument("--contexts", type=parse_lengths, default=parse_lengths("2k,4k,8k"))
            sub.add_argument("--score-last", type=int, default=1024)

    add_table_args(kinds.add_parser("table", help="one table from several result files (a sweep run in pieces)"))


def run_eval(args: argparse.Namespace) -> None:
    if args.kind == "table":
        return run_table(args)
    positions = getattr(args, "positions", None)
    positions = positions if positions is not None else [None]
    if not isinstance(positions, list):
        raise SystemExit("--positions takes a JSON list, e.g. '[{\"type\": \"rope\"}, {\"type\": \"ntk-mixed\", \"factor\": 2}]'")
    if args.kind == "nbce":  # checked before connecting, so a typo costs no round trip
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise SystemExit(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if not 0 <= args.first_trial < args.trials:
            raise SystemExit(f"--first-trial {args.first_trial} is out of range; trials are numbered 0 to {args.trials - 1}")
    if args.kind == "ruler":
        unknown = sorted(set(args.tasks) - set(TASKS))
        if unknown or args.samples < 1:
            raise SystemExit(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}" if unknown else "--samples must be at least 1")
    server = Server.connect(args.base_url, args.model, args.api_key)
    if args.kind == "nbce":
        from longserve.clients.nbce_eval import run_nbce

        result = run_nbce(server, args.docs, args.trials, methods, args.doc_tokens, args.truncate, args.scaled_position, args.seed,
                          args.first_trial)
    elif args.kind == "ruler":
        from longserve.clients.ruler import run_ruler

        result = run_ruler(server, args.lengths, args.tasks, args.samples, positions, args.seed)
    elif args.kind == "passkey":
        result = run_passkey(server, args.lengths, args.depths, args.trials, positions, args.seed)
    else:
        result = run_loss(server, args.text, args.contexts, args.score_last, positions)
    table, plot = table_for(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{args.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    written = [args.out / f"{stem}.json"]
    written[0].write_text(json.dumps(result, indent=1))
    if result["records"]:
        written.append(args.out / f"{stem}.png")
        plot(result, written[-1])
    print(table)
    print(f"wrote {' and '.join(map(str, written))}", file=sys.stderr)
    if result["interrupted"]:
        print(f"interrupted after {len(result['records'])} prompts; '-' marks cells not run", file=sys.stderr)
        raise SystemExit(130)  # as a shell reports Ctrl-C
