"""Passkey in one of n documents: NBCE against one long prompt and against truncation.

    longserve eval nbce --base-url URL --docs 4,8,16,24 --trials 5 \\
        --scaled-position '{"type": "dynamic", "factor": 2}'

Each trial builds n documents of about --doc-tokens tokens of the passkey
filler (patches/README.md, section 4); one of them, at random, holds the key sentence
at a random depth. The question is the passkey introduction and question.
Methods, each on the same documents:

- nbce: `contexts` = the documents, prompt = the question (longserve only);
- concat: the documents joined by blank lines, then the question, as one prompt;
- concat-scaled: the same prompt with --scaled-position sent as `position`;
- truncate: that prompt cut to its last --truncate tokens (the question kept).

A trial passes when the key appears in the first 10 generated tokens (greedy).
A prompt longer than the server's max_model_len is recorded as an error, not
a miss. Wall time is measured per request, prefill included.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from longserve.clients.prompts import ANSWER_TOKENS, PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_QUESTION, PASSKEY_SENTENCE
from longserve.clients.server_client import Server
QUESTION = PASSKEY_INTRO + PASSKEY_QUESTION


def documents(n: int, doc_tokens: int, filler_tokens: float, rng: random.Random) -> tuple[list[str], str, int]:
    """n filler documents, one with the key sentence; returns (documents, key, index of that document)."""
    fillers = max(1, int(doc_tokens / filler_tokens))
    key, holder = str(rng.randint(10000, 99999)), rng.randrange(n)
    before = rng.randint(0, fillers)
    docs = [PASSKEY_FILLER.strip() + PASSKEY_FILLER * (fillers - 1) for _ in range(n)]
    docs[holder] = (PASSKEY_FILLER * before + PASSKEY_SENTENCE.format(key=key) + PASSKEY_FILLER * (fillers - before)).strip()
    return docs, key, holder


def ask(server: Server, method: str, docs: list[str], scaled_position: dict | None, truncate: int) -> dict:
    joined = "\n\n".join(docs) + "\n\n" + QUESTION
    if method == "nbce":
        return server.complete(QUESTION, None, max_tokens=ANSWER_TOKENS, contexts=docs)
    if method == "concat":
        return server.complete(joined, None, max_tokens=ANSWER_TOKENS)
    if method == "concat-scaled":
        return server.complete(joined, scaled_position, max_tokens=ANSWER_TOKENS)
    tokens = server.tokenize(joined)
    return server.complete(tokens[-truncate:], None, max_tokens=ANSWER_TOKENS)


def run_nbce(server: Server, ns: list[int], trials: int, methods: list[str], doc_tokens: int, truncate: int,
             scaled_position: dict | None, seed: int, first_trial: int = 0) -> dict:
    rng = random.Random(seed)
    filler_tokens = len(server.tokenize(PASSKEY_FILLER * 64)) / 64
    records = []
    progress = tqdm(total=len(ns) * max(trials - first_trial, 0) * len(methods), desc="nbce", unit="prompt")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the run; what finished is kept
        for n in ns:
            for trial in range(trials):
                docs, key, holder = documents(n, doc_tokens, filler_tokens, rng)
                if trial < first_trial:  # drawn all the same, so later trials match a full run's
                    continue
                for method in methods:
                    started = time.perf_counter()
                    try:
                        reply = ask(server, method, docs, scaled_position, truncate)
                        answer, prompt_tokens, error = reply["choices"][0]["text"], reply["usage"]["prompt_tokens"], None
                    except (RuntimeError, httpx.HTTPError) as exc:
                        answer, prompt_tokens, error = "", None, str(exc)
                    records.append({
                        "method": method, "n": n, "trial": trial, "key": key, "holder": holder, "answer": answer,
                        "found": key in answer and error is None, "prompt_tokens": prompt_tokens,
                        "seconds": round(time.perf_counter() - started, 2), "error": error,
                    })
                    progress.set_postfix(n=n, method=method, found=key in answer)
                    progress.update()
    progress.close()
    return {"kind": "nbce", "interrupted": len(records) < progress.total, "model": server.model, "docs": ns, "trials": trials,
            "first_trial": first_trial, "doc_tokens": doc_tokens, "truncate": truncate, "scaled_position": scaled_position,
            "records": records}


def nbce_table(result: dict) -> str:
    methods = list(dict.fromkeys(r["method"] for r in result["records"]))
    lines = [f"{'n':>4} {'tokens':>8}  " + "".join(f"{m:>22}" for m in methods)]
    for n in result["docs"]:
        rows = [r for r in result["records"] if r["n"] == n]
        sizes = [r["prompt_tokens"] for r in rows if r["method"] == "concat" and r["prompt_tokens"]]
        cells = []
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            if not mine:
                cells.append("-")  # not run (interrupted)
                continue
            errors = sum(r["error"] is not None for r in mine)
            seconds = sum(r["seconds"] for r in mine) / len(mine)
            cell = f"{sum(r['found'] for r in mine)}/{len(mine)} {seconds:6.1f}s" + (f" ({errors} err)" if errors else "")
            cells.append(cell)
        tokens = f"{sum(sizes) // len(sizes)}" if sizes else "?"
        lines.append(f"{n:>4} {tokens:>8}  " + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def plot_nbce(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in result["records"]))
    fig, (accuracy, seconds) = plt.subplots(1, 2, figsize=(10, 3.6))
    for method in methods:
        hits, times = [], []
        for n in result["docs"]:
            mine = [r for r in result["records"] if r["method"] == method and r["n"] == n]
            hits.append(sum(r["found"] for r in mine) / len(mine) if mine else math.nan)
            times.append(sum(r["seconds"] for r in mine) / len(mine) if mine else math.nan)
        accuracy.plot(result["docs"], hits, marker="o", label=method)
        seconds.plot(result["docs"], times, marker="o", label=method)
    accuracy.set(xlabel="documents n", ylabel="accuracy", ylim=(-0.05, 1.05), title="passkey in one of n documents")
    seconds.set(xlabel="documents n", ylabel="seconds per request", title="wall time")
    accuracy.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
