"""Long-context evaluation against any OpenAI-compatible server.

    longserve eval passkey --base-url URL --lengths 4k,8k,16k --depths 0.1,0.5,0.9 --trials 3
    longserve eval loss --base-url URL --text FILE --contexts 2k,4k,8k,16k --score-last 1024

passkey: a key hidden at a depth in filler text (DESIGN.md section 6); a trial
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
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from clients.eval_table import add_table_args, run_table, table_for

METHODS = ("nbce", "concat", "concat-scaled", "truncate")  # clients/nbce_eval.py

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
ANSWER_TOKENS = 10


def parse_length(text: str) -> int:
    """'4k' -> 4096, '1500' -> 1500."""
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def parse_lengths(text: str) -> list[int]:
    return [parse_length(part) for part in text.split(",") if part.strip()]


def length_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


@dataclass
class Server:
    """What the evaluation needs from a server: a model name, token counts, completions."""

    base_url: str  # ends with /v1
    model: str
    api_key: str | None = None
    timeout: float = 3600.0

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/").removesuffix("/v1")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @classmethod
    def connect(cls, base_url: str, model: str | None, api_key: str | None) -> "Server":
        base_url = base_url.rstrip("/")
        if not base_url.endswith("/v1"):
            base_url += "/v1"
        server = cls(base_url, model or "", api_key)
        if not model:
            listing = httpx.get(f"{base_url}/models", headers=server.headers(), timeout=30)
            listing.raise_for_status()
            server.model = listing.json()["data"][0]["id"]
        return server

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` alone (no special tokens)."""
        return self.tokenize_body({"prompt": text, "add_special_tokens": False})["tokens"]

    def tokenize_body(self, body: dict) -> dict:
        """The server's /tokenize answer (vLLM's and longserve's shape: tokens, count) for `body` + the model."""
        response = httpx.post(f"{self.root}/tokenize", json={"model": self.model, **body}, headers=self.headers(), timeout=120)
        if response.status_code == 404:
            raise SystemExit("this server has no /tokenize endpoint; exact token counts need it")
        response.raise_for_status()
        return response.json()

    def complete(self, prompt, position: dict | None, **fields) -> dict:
        body = {"model": self.model, "prompt": prompt, "temperature": 0, **fields}
        if position is not None:
            body["position"] = position
        response = httpx.post(f"{self.base_url}/completions", json=body, headers=self.headers(), timeout=self.timeout)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        return response.json()


def position_label(position: dict | None) -> str:
    if position is None:
        return "server"
    parts = [position.get("type", "rope")]
    if "factor" in position:
        parts.append(f"x{position['factor']:g}")
    if position.get("type") == "ntk-mixed" and "b" in position:
        parts.append(f"b{position['b']:g}")
    if "window" in position:
        parts.append(f"w{position['window']}")
    if position.get("type") == "leaky-rerope" and "k" in position:
        parts.append(f"k{position['k']:g}")
    if position.get("logn"):
        parts.append("+logn")
    return " ".join(parts)


# ---- passkey -------------------------------------------------------------------


def passkey_prompt(server: Server, target_tokens: int, depth: float, key: str, sizes: dict) -> str:
    """A passkey prompt of about `target_tokens` tokens with the key at `depth` (0 = start, 1 = end)."""
    if not sizes:
        sizes["filler"] = len(server.tokenize(PASSKEY_FILLER * 64)) / 64
        sizes["fixed"] = len(server.tokenize(PASSKEY_INTRO + PASSKEY_SENTENCE.format(key="12345") + PASSKEY_QUESTION))
    fillers = max(1, int((target_tokens - sizes["fixed"]) / sizes["filler"]))
    before = round(fillers * depth)
    return (
        PASSKEY_INTRO
        + PASSKEY_FILLER * before
        + PASSKEY_SENTENCE.format(key=key)
        + PASSKEY_FILLER * (fillers - before)
        + PASSKEY_QUESTION
    )


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


def passkey_table(result: dict) -> str:
    methods = list(dict.fromkeys(r["method"] for r in result["records"]))
    lengths = result["lengths"]
    header = f"{'method':<24}" + "".join(f"{length_label(n):>10}" for n in lengths)
    lines = [header]
    for method in methods:
        cells = []
        for length in lengths:
            hits = [r["found"] for r in result["records"] if r["method"] == method and r["length"] == length]
            cells.append(f"{sum(hits)}/{len(hits)}" if hits else "-")  # "-": not run (interrupted)
        lines.append(f"{method:<24}" + "".join(f"{cell:>10}" for cell in cells))
    return "\n".join(lines)


def plot_passkey(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in result["records"]))
    lengths, depths = result["lengths"], result["depths"]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = [[0.0] * len(lengths) for _ in depths]
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                hits = [r["found"] for r in result["records"] if r["method"] == method and r["length"] == length and r["depth"] == depth]
                grid[i][j] = sum(hits) / len(hits) if hits else math.nan
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(method, fontsize=9)
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(f"passkey retrieval, {result['model']}", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


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


def loss_table(result: dict) -> str:
    methods = list(dict.fromkeys(r["method"] for r in result["records"]))
    contexts = result["contexts"]
    lines = [f"{'method':<24}" + "".join(f"{length_label(c):>10}" for c in contexts)]
    for method in methods:
        by_context = {r["context"]: r["loss"] for r in result["records"] if r["method"] == method}
        cells = [("-" if c not in by_context else "error" if by_context[c] is None else f"{by_context[c]:.3f}") for c in contexts]
        lines.append(f"{method:<24}" + "".join(f"{cell:>10}" for cell in cells))
    return "\n".join(lines)


def plot_loss(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in result["records"]):
        points = [(r["context"], r["loss"]) for r in result["records"] if r["method"] == method and r["loss"] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["contexts"], [length_label(c) for c in result["contexts"]])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"loss of the last {result['score_last']} tokens")
    ax.set_title(f"loss at length, {result['model']}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---- command line ----------------------------------------------------------------


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", required=True)
    helps = {"passkey": "passkey retrieval by length and depth", "loss": "loss of a text's last tokens as context grows",
             "nbce": "passkey in one of n documents: NBCE, one long prompt, truncation"}
    for kind, text in helps.items():
        sub = kinds.add_parser(kind, help=text)
        sub.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
        sub.add_argument("--model", help="model name (default: the server's first model)")
        sub.add_argument("--api-key", help="bearer key, if the server wants one")
        if kind != "nbce":
            sub.add_argument("--positions", type=json.loads, help="JSON list of position settings to compare (longserve only)")
        sub.add_argument("--out", type=Path, default=Path("results"), help="directory for the JSON and PNG (default results/)")
        sub.add_argument("--name", help="file name stem (default: the kind and a timestamp)")
        if kind == "passkey":
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
    server = Server.connect(args.base_url, args.model, args.api_key)
    if args.kind == "nbce":
        from clients.nbce_eval import run_nbce

        result = run_nbce(server, args.docs, args.trials, methods, args.doc_tokens, args.truncate, args.scaled_position, args.seed,
                          args.first_trial)
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
