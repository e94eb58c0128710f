"""`longserve bench`: a load tester for any OpenAI-compatible server (ours, vLLM, llama.cpp, ...).

    longserve bench --base-url http://127.0.0.1:8000/v1 --dataset random --input-len 256 --output-len 64 \\
        --num-prompts 32 --max-concurrency 8 --result-file bench.json --plot plots/

Requests are streamed (SSE); every figure comes from what the client sees
(clients/bench_stats.py has the definitions, under vLLM's bench names).
Arrivals: all at once with --request-rate inf, else gamma-distributed gaps
with mean 1/rate and shape --burstiness (1 = Poisson); --max-concurrency caps
the requests in flight. Loops are bounded: --num-prompts requests, each
within --timeout, the whole run within --max-duration. Ctrl-C stops sending,
cancels what is in flight and prints the report of what finished.

Use it only against servers you own or may load: it sends what you ask, as
fast as you ask, to whatever --base-url says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from longserve.clients.bench_datasets import DATASETS, build
from longserve.clients.bench_stats import Record, detailed, parse_slo, report, summarize
from longserve.clients.server_client import Server


def arrival_gaps(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request: 0 at rate inf, else gamma(shape=burstiness, mean=1/rate)."""
    if rate == float("inf"):
        return [0.0] * count
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count).tolist()


def chunk_text(endpoint: str, chunk: dict) -> str:
    if not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    if endpoint == "completions":
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


async def send(client: httpx.AsyncClient, url: str, endpoint: str, body: dict, record: Record, clock, keep_text: bool) -> None:
    """Stream one request into `record`; failures become record.error, never exceptions."""
    text, finished, usage = [], False, None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                record.error = f"http_{response.status_code}"
                record.detail = (await response.aread()).decode("utf-8", "replace")[:300]
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error, record.detail = "stream_error", str(chunk["error"])[:300]
                    return
                now = clock()
                if piece := chunk_text(endpoint, chunk):
                    if record.ttft is None:
                        record.ttft = now - record.sent
                    record.chunk_times.append(now)
                    text.append(piece)
                usage = chunk.get("usage") or usage
        if not finished:
            record.error, record.detail = "stream_cut", "the stream ended before [DONE]"
            return
        record.end = clock()
        if usage:
            record.output_tokens = usage.get("completion_tokens", len(record.chunk_times))
            record.input_tokens = usage.get("prompt_tokens", record.input_tokens)
        else:
            record.output_tokens = len(record.chunk_times)  # a server without usage in streams: one token per chunk
        if keep_text:
            record.detail = "".join(text)
    except httpx.ConnectError as exc:
        record.error, record.detail = "connect_error", str(exc)
    except httpx.TimeoutException:
        record.error, record.detail = "timeout", "no answer within --timeout"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        record.error, record.detail = ("stream_cut" if isinstance(exc, httpx.RemoteProtocolError) else type(exc).__name__), str(exc)[:300]
    finally:
        if record.end is None and record.error is not None:
            record.end = clock()


async def run_load(args, server: Server, bodies: list[dict], input_tokens: list[int | None], concurrency: int | None,
                   rate: float, progress: bool = True) -> tuple[list[Record], float, bool]:
    """Send `bodies` with the load shape; returns (records of requests sent, duration, interrupted)."""
    url = f"{server.base_url}/{'completions' if args.endpoint == 'completions' else 'chat/completions'}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread: no Ctrl-C handling
        pass
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    records: list[Record] = []
    bar = tqdm(total=len(bodies), desc="bench", unit="req", disable=not progress, file=sys.stderr)

    failed = 0

    async def one(body: dict, tokens: int | None) -> None:
        nonlocal failed
        record = None
        try:
            if limit:
                async with limit:
                    record = await fire(body, tokens)
            else:
                record = await fire(body, tokens)
        finally:
            if record is not None and record.error:
                failed += 1
                bar.set_postfix(failed=failed, refresh=False)
            bar.update(1)

    async def fire(body: dict, tokens: int | None) -> Record | None:
        if stop.is_set():
            return None
        record = Record(sent=clock(), input_tokens=tokens)
        records.append(record)
        await send(client, url, args.endpoint, body, record, clock, args.save_detailed)
        return record

    timeout = httpx.Timeout(args.timeout, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, headers=server.headers(), limits=httpx.Limits(max_connections=None)) as client:
        started = time.perf_counter()  # after building the client: its TLS context is set-up, not load
        clock = lambda: time.perf_counter() - started  # noqa: E731
        tasks = []
        for body, tokens, gap in zip(bodies, input_tokens, arrival_gaps(len(bodies), rate, args.burstiness, args.seed)):
            if gap > 0:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=gap)
                except asyncio.TimeoutError:
                    pass
            if stop.is_set() or clock() > args.max_duration:
                break
            tasks.append(asyncio.create_task(one(body, tokens)))
        waiter = asyncio.create_task(stop.wait())
        pending = set(tasks)
        deadline = args.max_duration - clock()
        while pending and not stop.is_set() and deadline > 0:
            _, pending = await asyncio.wait(pending | {waiter}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(waiter)
            deadline = args.max_duration - clock()
        for task in pending:  # interrupted or out of time: what is in flight is cancelled and counted
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        waiter.cancel()
    bar.close()
    duration = clock()
    interrupted = stop.is_set() or duration > args.max_duration
    for record in records:
        if record.end is None:
            record.error, record.detail, record.end = "cancelled", "the run stopped before this request finished", duration
    try:
        loop.remove_signal_handler(signal.SIGINT)
    except (NotImplementedError, RuntimeError, ValueError):
        pass
    return records, duration, interrupted


def full_body(args, server: Server, body: dict) -> dict:
    full = {"model": server.model, **body, "stream": True, "stream_options": {"include_usage": True}}
    if args.temperature is not None:
        full.setdefault("temperature", args.temperature)
    if args.ignore_eos:
        full["ignore_eos"] = True  # a vLLM extension; OpenAI itself rejects it
    return full


async def warm_up(args, server: Server, bodies: list[dict]) -> None:
    if bodies:
        print(f"warming up with {len(bodies)} request(s), one at a time", file=sys.stderr)
        for body in bodies:
            await run_load(args, server, [body], [None], 1, float("inf"), progress=False)


def one_run(args, server: Server, bodies, tokens, concurrency, rate) -> dict:
    records, duration, interrupted = asyncio.run(run_load(args, server, bodies, tokens, concurrency, rate))
    summary = summarize(records, duration, args.percentiles, args.slo)
    summary.update({"max_concurrency": concurrency, "request_rate": rate, "burstiness": args.burstiness,
                    "interrupted": interrupted, "records": records})
    return summary


def run_bench(args: argparse.Namespace) -> int:
    args.slo = parse_slo(args.slo_text)
    server = Server.connect(args.base_url, args.model, args.api_key)
    items = build(args, server)
    bodies = [full_body(args, server, item.body) for item in items]
    tokens = [item.input_tokens for item in items]
    asyncio.run(warm_up(args, server, bodies[: args.warmup]))
    bodies, tokens = bodies[args.warmup :], tokens[args.warmup :]
    runs = []
    for concurrency, rate in sweep_points(args):
        print(f"load: {len(bodies)} requests, rate {rate}, burstiness {args.burstiness}, max concurrency {concurrency or 'none'}",
              file=sys.stderr)
        summary = one_run(args, server, bodies, tokens, concurrency, rate)
        print(report(summary, f"{server.model} @ {args.base_url}"))
        runs.append(summary)
        if summary["interrupted"]:
            break
    write_outputs(args, server, runs)
    if runs and runs[-1]["interrupted"]:
        return 130
    return 0 if all(run["completed"] for run in runs) else 1


def sweep_points(args) -> list[tuple[int | None, float]]:
    if not args.sweep:
        return [(args.max_concurrency, args.request_rate)]
    name, _, values = args.sweep.partition("=")
    parsed = [float(v) for v in values.split(",") if v]
    if name == "rate" and parsed:
        return [(args.max_concurrency, v) for v in parsed]
    if name == "concurrency" and parsed and all(v >= 1 for v in parsed):
        return [(int(v), args.request_rate) for v in parsed]
    raise SystemExit(f"--sweep {args.sweep!r}: write rate=1,2,4,inf or concurrency=1,8,32")


def write_outputs(args, server: Server, runs: list[dict]) -> None:
    from longserve.clients.bench_plot import plot_runs

    settings = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
    settings["request_rate"] = str(args.request_rate)
    results = []
    for run in runs:
        records = run.pop("records")
        result = {"model_id": server.model, "base_url": args.base_url, "endpoint": args.endpoint, "dataset": args.dataset, **run}
        if result["request_rate"] == float("inf"):
            result["request_rate"] = "inf"  # as vLLM writes it: plain JSON has no infinity
        if args.save_detailed:
            result.update(detailed(records))
        results.append((result, records))
    if args.result_file:
        payload = results[0][0] if len(results) == 1 else {"settings": settings, "runs": [r for r, _ in results]}
        Path(args.result_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_file).write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {args.result_file}", file=sys.stderr)
    if args.plot:
        for path in plot_runs(results, Path(args.plot)):
            print(f"wrote {path}", file=sys.stderr)


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL (only servers you own)")
    add("--model", help="model name (default: the server's first model)")
    add("--api-key")
    add("--endpoint", choices=["completions", "chat"], default="completions")
    add("--dataset", choices=DATASETS, default="random")
    add("--dataset-path", help="file: JSON lines of request bodies; kgclue: the questions (JSON lines)")
    add("--input-len", type=int, default=256, help="prompt tokens (random: exact; passkey, nbce: about)")
    add("--output-len", type=int, default=64, help="max_tokens of each request")
    add("--nbce-contexts", type=int, default=4, help="nbce: documents per request")
    add("--trie", help="kgclue: the knowledge base on the server")
    add("--num-prompts", type=int, default=100)
    add("--request-rate", type=float, default=float("inf"), help="requests per second (inf: all at once)")
    add("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 Poisson, <1 burstier, >1 steadier")
    add("--max-concurrency", type=int, help="requests in flight at most")
    add("--seed", type=int, default=0)
    add("--warmup", type=int, default=0, help="requests sent one at a time before the measured run")
    add("--temperature", type=float, default=0.0, help="set where a body has none (default greedy)")
    add("--ignore-eos", action="store_true", help="ask the server to run to --output-len (vLLM extension)")
    add("--slo", dest="slo_text", help="goodput SLOs in ms, e.g. ttft=500,tpot=50")
    add("--percentiles", type=lambda s: [float(p) for p in s.split(",")], default=[50, 90, 99])
    add("--sweep", help="rate=1,2,4,inf or concurrency=1,8,32: one run each, and the throughput-latency curve")
    add("--timeout", type=float, default=600.0, help="seconds per request")
    add("--max-duration", type=float, default=3600.0, help="seconds for the whole run; what is in flight then is cancelled")
    add("--result-file", help="JSON with vLLM's bench field names")
    add("--save-detailed", action="store_true", help="keep per-request records in the result file")
    add("--plot", help="directory for PNGs: latency CDFs, throughput and concurrency over time, the sweep curve")


def check_args(args) -> None:
    problems = [f"--{name.replace('_', '-')} must be at least 1" for name in ("num_prompts", "input_len", "output_len", "nbce_contexts")
                if getattr(args, name) < 1]
    if args.request_rate <= 0 or args.burstiness <= 0:
        problems.append("--request-rate and --burstiness must be positive")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        problems.append("--max-concurrency must be at least 1")
    if args.warmup < 0 or args.timeout <= 0 or args.max_duration <= 0:
        problems.append("--warmup must be >= 0, --timeout and --max-duration positive")
    if problems:
        raise SystemExit("longserve bench: " + "; ".join(problems))


def run_bench_command(args: argparse.Namespace) -> None:
    check_args(args)
    try:
        code = run_bench(args)
    except httpx.HTTPError as exc:  # before the load: the model list, /tokenize
        raise SystemExit(f"longserve bench: cannot prepare the load against {args.base_url}: {exc}") from None
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="longserve bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    run_bench_command(parser.parse_args(argv))


if __name__ == "__main__":
    main()
