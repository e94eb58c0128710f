"""`longserve eval ruler`: RULER's synthetic tasks (clients/ruler_tasks.py) by length, against any server.

    longserve eval ruler --base-url URL --lengths 4k,8k,16k --samples 10 [--tasks niah_single,vt,...] [--positions JSON]

Every sample is built to its length exactly: the haystack is sized from the
text's characters per token, then measured with the server's /tokenize and
resized until the prompt plus the task's answer budget fits the length, and
stays within 5 % under it. Answers are greedy. A task's score at a length is
the mean over its samples of the share of references in the answer; the
length's score is the mean over tasks. The effective length is RULER's: the
longest tested length up to which every score reaches 85.6 (Llama-2-7B's own
score at 4k), or none.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from longserve.clients.prompts import length_label, position_label
from longserve.clients.ruler_tasks import ANSWER_TOKENS, TASKS, Sample, make, score
from longserve.clients.server_client import Server

THRESHOLD = 85.6


def fitted(server: Server, task: str, seed: int, target: int, ratio: list[float]) -> tuple[Sample, int]:
    """The sample with as many haystack characters as fit `target` tokens; `ratio` (chars per token) is learnt."""
    chars = int(target * ratio[0])
    for _ in range(6):
        sample = make(task, seed, chars)
        tokens = len(server.tokenize(sample.prompt))
        if 0.95 * target <= tokens <= target:
            return sample, tokens
        ratio[0] = len(sample.prompt) / tokens
        chars = int(chars * (0.975 * target / tokens))
    raise RuntimeError(f"{task} sample {seed} did not fit {target} tokens (last try {tokens})")


def run_ruler(server: Server, lengths: list[int], tasks: list[str], samples: int, positions: list, seed: int) -> dict:
    records = []
    ratio = [3.5]  # characters per token, refined by every fit
    progress = tqdm(total=len(positions) * len(lengths) * len(tasks) * samples, desc="ruler", unit="sample")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the run; what finished is kept
        for position in positions:
            for length in lengths:
                for task in tasks:
                    for index in range(samples):
                        started = time.perf_counter()
                        try:
                            sample, prompt_tokens = fitted(server, task, seed + index, length - ANSWER_TOKENS[task] - 8, ratio)
                            reply = server.complete(sample.prompt, position, max_tokens=ANSWER_TOKENS[task])
                            answer, error = reply["choices"][0]["text"], None
                            value = score(answer, sample.references)
                        except (RuntimeError, ValueError, httpx.HTTPError) as exc:  # one failed sample, not the run
                            sample, prompt_tokens, answer, error, value = None, None, "", str(exc), 0.0
                        records.append({
                            "method": position_label(position), "position": position, "length": length, "task": task,
                            "sample": index, "score": value, "answer": answer, "prompt_tokens": prompt_tokens,
                            "references": sample.references if sample else None, "error": error,
                            "seconds": round(time.perf_counter() - started, 2),
                        })
                        progress.set_postfix(method=position_label(position), length=length_label(length), task=task)
                        progress.update()
    progress.close()
    return {"kind": "ruler", "interrupted": len(records) < progress.total, "model": server.model, "lengths": lengths,
            "tasks": tasks, "samples": samples, "threshold": THRESHOLD, "records": records}


def scores(result: dict) -> dict:
    """{method: {length: {task: mean score, ..., "average": mean over tasks}}} over the cells that ran."""
    table: dict = {}
    for record in result["records"]:
        cell = table.setdefault(record["method"], {}).setdefault(record["length"], {}).setdefault(record["task"], [])
        cell.append(record["score"])
    for by_length in table.values():
        for length, by_task in by_length.items():
            means = {task: sum(values) / len(values) for task, values in by_task.items()}
            by_length[length] = {**means, "average": sum(means.values()) / len(means)}
    return table


def effective_length(by_length: dict, lengths: list[int], threshold: float = THRESHOLD) -> int | None:
    """The longest length up to which every tested length's average reaches `threshold`."""
    best = None
    for length in sorted(lengths):
        if length not in by_length or by_length[length]["average"] < threshold:
            break
        best = length
    return best


def ruler_table(result: dict) -> str:
    table, lengths = scores(result), result["lengths"]
    width = max([len("method"), *map(len, table)]) + 2  # a method's name never runs into the task
    lines = [f"{'method':<{width}}{'task':<18}" + "".join(f"{length_label(n):>8}" for n in lengths)]
    for method, by_length in table.items():
        for task in [*result["tasks"], "average"]:
            cells = [f"{by_length[n][task]:.1f}" if task in by_length.get(n, {}) else "-" for n in lengths]
            lines.append(f"{method:<{width}}{task:<18}" + "".join(f"{cell:>8}" for cell in cells))
        found = effective_length(by_length, lengths, result["threshold"])
        meaning = (f"every average up to it >= {result['threshold']}" if found
                   else f"the shortest length's average is under {result['threshold']}")
        lines.append(f"{method:<{width}}{'effective length':<18}{length_label(found) if found else 'none':>8}   ({meaning})")
    return "\n".join(lines)


def plot_ruler(result: dict, path: Path) -> None:
    """A heatmap per method: tasks (and the average) by length, score 0-100."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, lengths, rows = scores(result), result["lengths"], [*result["tasks"], "average"]
    fig, axes = plt.subplots(1, len(table), figsize=(2.2 + 1.1 * len(lengths) * len(table), 0.45 * len(rows) + 1.6), squeeze=False)
    for ax, (method, by_length) in zip(axes[0], table.items()):
        grid = [[by_length.get(n, {}).get(task, math.nan) for n in lengths] for task in rows]
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_yticks(range(len(rows)), rows)
        ax.set_title(method, fontsize=9)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, "-" if math.isnan(value) else f"{value:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="score")
    fig.suptitle(f"RULER tasks: {result['model']}", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
