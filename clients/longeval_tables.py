"""The tables and plots of `longserve eval passkey` and `longserve eval loss` results."""

from __future__ import annotations

import math
from pathlib import Path

from longserve.clients.prompts import length_label


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
