"""What `longserve bench` measures, from per-request records, under vLLM's bench field names.

Definitions (as vLLM's `vllm bench serve` uses them):
- TTFT: request sent -> first chunk that carries text;
- ITL: the gaps between consecutive text chunks, all requests pooled;
- TPOT: per request, (E2E - TTFT) / (output tokens - 1), for requests with more than one token;
- E2EL: request sent -> last byte of the stream;
- throughputs: completed requests, output tokens and input + output tokens per second of the whole run;
- goodput: completed requests per second that met every SLO given (--slo ttft=MS,tpot=MS,...).
Failed requests count in `failed` and by kind in `errors_by_kind` (e.g. "http_429", "stream_cut",
"connect_error"); they never enter the latency figures, and they are never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class Record:
    """One request as the client saw it; times in seconds from the start of the run."""

    sent: float
    input_tokens: int | None = None  # the server's usage when it reports one, else the dataset's count
    output_tokens: int = 0
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each text chunk
    end: float | None = None
    error: str | None = None  # kind of failure, None when the request completed
    detail: str = ""  # the failure's message, or the generated text with --save-detailed

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2el(self) -> float | None:
        return None if self.end is None else self.end - self.sent

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def parse_slo(text: str | None) -> dict[str, float]:
    """"ttft=500,tpot=50" -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    if not text:
        return {}
    slo = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip().lower()
        if name not in METRICS or not value:
            raise ValueError(f"--slo: {part!r}: write NAME=MS with NAME one of {', '.join(METRICS)}, e.g. ttft=500,tpot=50")
        slo[name] = float(value)
    return slo


def meets(record: Record, slo: dict[str, float]) -> bool:
    for name, limit_ms in slo.items():
        values = record.itls if name == "itl" else [getattr(record, name)]
        if any(v is None or v * 1000 > limit_ms for v in values):
            return False
    return True


def summarize(records: list[Record], duration: float, percentiles=(50, 90, 99), slo: dict[str, float] | None = None) -> dict:
    done = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    duration = max(duration, 1e-9)
    total_input = sum(r.input_tokens or 0 for r in done)
    total_output = sum(r.output_tokens for r in done)
    summary = {
        "duration": duration, "num_prompts": len(records), "completed": len(done), "failed": len(records) - len(done),
        "errors_by_kind": errors, "total_input_tokens": total_input, "total_output_tokens": total_output,
        "request_throughput": len(done) / duration, "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "max_concurrency_observed": max_concurrency(records),
    }
    samples = {"ttft": [r.ttft for r in done if r.ttft is not None], "tpot": [r.tpot for r in done if r.tpot is not None],
               "itl": [gap for r in done for gap in r.itls], "e2el": [r.e2el for r in done]}
    for name in METRICS:
        values = np.asarray(samples[name], dtype=float) * 1000
        summary[f"mean_{name}_ms"] = float(values.mean()) if len(values) else 0.0
        summary[f"median_{name}_ms"] = float(np.median(values)) if len(values) else 0.0
        summary[f"std_{name}_ms"] = float(values.std()) if len(values) else 0.0
        for p in percentiles:
            summary[f"p{p:g}_{name}_ms"] = float(np.percentile(values, p)) if len(values) else 0.0
    if slo:
        summary["slo_ms"] = slo
        summary["request_goodput"] = sum(1 for r in done if meets(r, slo)) / duration
    return summary


def in_flight(records: list[Record]) -> tuple[list[float], list[int]]:
    """Requests in flight over time: the times at which the count changes, and the count from each on."""
    events = sorted([(r.sent, 1) for r in records] + [(r.end if r.end is not None else r.sent, -1) for r in records],
                    key=lambda e: (e[0], e[1]))  # at equal times a request leaves before the next one comes
    levels, level = [], 0
    for _, step in events:
        level += step
        levels.append(level)
    return [t for t, _ in events], levels


def max_concurrency(records: list[Record]) -> int:
    """The most requests in flight at once."""
    return max(in_flight(records)[1], default=0)


def detailed(records: list[Record]) -> dict:
    """Per-request lists, under vLLM's --save-detailed names where they exist."""
    return {
        "input_lens": [r.input_tokens for r in records], "output_lens": [r.output_tokens for r in records],
        "ttfts": [r.ttft for r in records], "itls": [r.itls for r in records], "e2els": [r.e2el for r in records],
        "start_times": [r.sent for r in records], "errors": [r.error or "" for r in records],
        "generated_texts": [r.detail if r.ok else "" for r in records],
        "error_details": [r.detail if not r.ok else "" for r in records],
    }


def report(summary: dict, title: str = "longserve bench") -> str:
    """The summary as the text table the command prints."""
    lines = [f"{'=' * 20} {title} {'=' * 20}"]
    if summary.get("interrupted"):
        lines.append("INTERRUPTED: partial figures over the requests that finished")
    rows = [("Successful requests", summary["completed"]), ("Failed requests", summary["failed"])]
    rows += [(f"  errors: {kind}", count) for kind, count in sorted(summary["errors_by_kind"].items())]
    rows += [("Benchmark duration (s)", f"{summary['duration']:.2f}"), ("Total input tokens", summary["total_input_tokens"]),
             ("Total generated tokens", summary["total_output_tokens"]),
             ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
             ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
             ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
             ("Peak concurrent requests", summary["max_concurrency_observed"])]
    if "request_goodput" in summary:
        rows.append(("Request goodput (req/s)", f"{summary['request_goodput']:.2f}"))
    for name in METRICS:
        keys = [k for k in summary if k.endswith(f"_{name}_ms") and not k.startswith("std")]
        rows += [(f"{k.split('_')[0].capitalize()} {name.upper()} (ms)", f"{summary[k]:.2f}") for k in keys]
    lines += [f"{label:<40}{value:>12}" for label, value in rows]
    return "\n".join(lines)
