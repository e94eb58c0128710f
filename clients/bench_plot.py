"""PNGs for `longserve bench --plot DIR`: latency CDFs, throughput and concurrency over time, the sweep curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from longserve.clients.bench_stats import Record, in_flight


def run_label(result: dict) -> str:
    rate = result["request_rate"]
    rate = "inf" if rate in ("inf", float("inf")) else f"{rate:g}"
    return f"rate {rate}, concurrency {result['max_concurrency'] or 'none'}"


def plot_runs(results: list[tuple[dict, list[Record]]], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []

    figure, axes = plt.subplots(1, 4, figsize=(18, 4))
    for result, records in results:
        done = [r for r in records if r.ok]
        samples = {"TTFT": [r.ttft for r in done if r.ttft is not None], "TPOT": [r.tpot for r in done if r.tpot is not None],
                   "ITL": [g for r in done for g in r.itls], "E2E latency": [r.e2el for r in done]}
        for axis, (name, values) in zip(axes, samples.items()):
            if values:
                values = np.sort(np.asarray(values) * 1000)
                axis.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=run_label(result))
            axis.set_xlabel(f"{name} (ms)")
            axis.set_ylabel("fraction of requests" if name != "ITL" else "fraction of gaps")
            axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("latency CDFs")
    figure.tight_layout()
    written.append(directory / "latency_cdf.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)

    result, records = results[-1]
    figure, (tokens_axis, level_axis) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    end = max((r.end or r.sent for r in records), default=0.0)
    bins = np.arange(0.0, end + 1.0, 1.0)
    times, weights = [], []
    for r in records:
        if r.ok and r.chunk_times:  # spread the request's counted tokens over its chunks
            times += r.chunk_times
            weights += [r.output_tokens / len(r.chunk_times)] * len(r.chunk_times)
    counts, _ = np.histogram(times, bins=bins, weights=weights)
    tokens_axis.bar(bins[:-1], counts, width=1.0, align="edge")
    tokens_axis.set_ylabel("output tokens / s")
    level_axis.step(*in_flight(records), where="post")
    level_axis.set_ylabel("requests in flight")
    level_axis.set_xlabel("seconds since start")
    figure.suptitle(f"throughput and concurrency over time ({run_label(result)})")
    figure.tight_layout()
    written.append(directory / "over_time.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)

    if len(results) > 1:
        figure, axis = plt.subplots(figsize=(7, 5))
        throughput = [r["output_throughput"] for r, _ in results]
        for key, label in (("median_ttft_ms", "TTFT p50"), ("median_tpot_ms", "TPOT p50"), ("p99_ttft_ms", "TTFT p99")):
            axis.plot(throughput, [r.get(key, 0.0) for r, _ in results], marker="o", label=label)
        for (result, _), x in zip(results, throughput):
            axis.annotate(run_label(result).replace("concurrency", "c"), (x, result["median_ttft_ms"]), fontsize=7)
        axis.set_xlabel("output throughput (tok/s)")
        axis.set_ylabel("latency (ms)")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend()
        axis.set_title("throughput-latency curve")
        figure.tight_layout()
        written.append(directory / "sweep.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)
    return written
