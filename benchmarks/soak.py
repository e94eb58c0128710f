"""`make soak`: a long mixed load with random disconnects; does the server leak or fail?

Starts `longserve serve` on loopback (or uses --base-url with --pid), registers
a small knowledge base, then runs --clients streaming clients for --minutes.
Each client loops over four kinds of request chosen at random: chat,
completions, NBCE over three contexts, and beam search over the trie; a
fraction (--disconnect) walks away mid-answer. At the end it prints:
- the server's RSS at start, after --warmup-minutes and at the end;
- the running and waiting counts once the load stops (leaked sequences);
- outcomes and errors by kind (every 5xx counts);
- p50 / p99 latency of completed requests, minute by minute;
and PASS or FAIL against the targets: RSS growth after warm-up < 5 %, no
leaked sequence, no 5xx. Exit code 1 on FAIL. Traffic goes to 127.0.0.1 only.

    python benchmarks/soak.py --minutes 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import httpx
import numpy as np

KINDS = ("chat", "completion", "nbce", "beam")
TRIE = "soak-kb"
WORDS = ("river", "castle", "winter", "harbour", "lantern", "meadow", "copper", "violet", "falcon", "orchard")


@dataclass
class Outcome:
    kind: str
    started: float  # seconds since the load began
    seconds: float
    result: str  # "ok", "disconnected", "http_NNN", "error_event", "connect_error", ...


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, default=3.0, help="RSS growth is measured from here")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--disconnect", type=float, default=0.2, help="fraction of requests dropped mid-answer")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8400, help="for the server this command starts")
    parser.add_argument("--server-args", default="--max-num-seqs 16 --log-level warning", help="extra flags for `longserve serve`")
    parser.add_argument("--base-url", help="an already running longserve (then give --pid for its RSS)")
    parser.add_argument("--pid", type=int, help="the process id of the server at --base-url")
    args = parser.parse_args(argv)
    if args.base_url and not args.pid:
        parser.error("--base-url needs --pid: the soak reports the server's RSS")
    if not 0 <= args.disconnect <= 1 or args.clients < 1 or args.minutes <= 0:
        parser.error("--disconnect is a fraction in [0, 1]; --clients and --minutes must be positive")
    if not 0 <= args.warmup_minutes < args.minutes:
        parser.error("--warmup-minutes must be shorter than --minutes")
    return args


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_server(args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "longserve.server.cli", "serve", "--port", str(args.port), *args.server_args.split()]
    process = subprocess.Popen(command, start_new_session=True)
    url = f"http://127.0.0.1:{args.port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"soak: the server exited with code {process.returncode} at start")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    sys.exit("soak: the server did not become healthy within 300 s")


def body_for(kind: str, rng: random.Random, max_tokens: int) -> tuple[str, dict]:
    word = rng.choice(WORDS)
    if kind == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Write a line about a {word}."}],
                                        "max_tokens": max_tokens, "stream": True, "temperature": 0.7}
    if kind == "completion":
        return "/v1/completions", {"prompt": f"The {word} stood", "max_tokens": max_tokens, "stream": True}
    if kind == "nbce":
        contexts = [f"Note {i}: the {rng.choice(WORDS)} is number {rng.randrange(100)}." for i in range(3)]
        return "/v1/completions", {"prompt": f"Which number has the {word}? Answer:", "contexts": contexts,
                                   "max_tokens": max_tokens, "stream": True, "temperature": 0.0}
    return "/v1/completions", {"prompt": f"Question: what is near the {word}? Answer:", "max_tokens": 12,
                               "constraint": {"trie": TRIE}, "use_beam_search": True, "n": 2, "temperature": 0.0}


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random, args, started_at: float) -> Outcome:
    path, body = body_for(kind, rng, args.max_tokens)
    sent = time.monotonic()
    result = "ok"
    drop_after = rng.randrange(1, 6) if rng.random() < args.disconnect else None
    try:
        if not body.get("stream"):
            response = await client.post(path, json=body)
            result = "ok" if response.status_code == 200 else f"http_{response.status_code}"
        else:
            async with client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    result = f"http_{response.status_code}"
                else:
                    events = 0
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        events += 1
                        if '"error"' in line and "error" in json.loads(line[6:]):
                            result = "error_event"
                        if drop_after is not None and events >= drop_after:
                            result = "disconnected"
                            break  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as exc:
        result = type(exc).__name__
    return Outcome(kind, sent - started_at, time.monotonic() - sent, result)


async def client_loop(index: int, url: str, args, deadline: float, started_at: float, outcomes: list[Outcome]):
    rng = random.Random(args.seed * 1000 + index)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        while time.monotonic() < deadline:
            outcomes.append(await one_request(client, rng.choice(KINDS), rng, args, started_at))


async def watch_rss(pid: int, started_at: float, samples: list[tuple[float, float]], deadline: float, outcomes) -> None:
    minute = 0
    while time.monotonic() < deadline:
        now = time.monotonic() - started_at
        samples.append((now, rss_mib(pid)))
        if now >= 60 * (minute + 1):
            minute += 1
            errors = sum(1 for o in outcomes if o.result not in ("ok", "disconnected"))
            print(f"soak: minute {minute}: {len(outcomes)} requests, {errors} failed, RSS {samples[-1][1]:.0f} MiB",
                  flush=True)
        await asyncio.sleep(5)


async def queue_counts(url: str) -> tuple[float, float]:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{url}/metrics")).text
    values = {}
    for line in text.splitlines():
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values.get("vllm:num_requests_running", -1), values.get("vllm:num_requests_waiting", -1)


async def settle(url: str, seconds: float = 30) -> tuple[float, float]:
    """Running and waiting once the load has stopped, after up to `seconds` for aborts to land."""
    deadline = time.monotonic() + seconds
    counts = await queue_counts(url)
    while counts != (0, 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        counts = await queue_counts(url)
    return counts


def register_trie(url: str) -> None:
    entries = [{"key": f"the {a} by the {b}", "value": i} for i, (a, b) in
               enumerate((a, b) for a in WORDS for b in WORDS if a != b)]
    response = httpx.post(f"{url}/v1/tries", json={"name": TRIE, "entries": entries, "lead": " "}, timeout=120)
    response.raise_for_status()


def report(outcomes: list[Outcome], rss: list[tuple[float, float]], warmup: float, counts, minutes: float) -> bool:
    start_rss, end_rss = rss[0][1], rss[-1][1]
    warm_rss = next((value for at, value in rss if at >= warmup), end_rss)
    growth = (end_rss - warm_rss) / warm_rss * 100
    by_result = Counter(o.result for o in outcomes)
    by_kind = Counter(o.kind for o in outcomes)
    server_errors = sum(n for result, n in by_result.items() if result.startswith("http_5"))
    print(f"\nsoak: {len(outcomes)} requests in {minutes:g} min: " + ", ".join(f"{k} {by_kind[k]}" for k in KINDS))
    print(f"RSS: start {start_rss:.0f} MiB, after warm-up ({warmup / 60:g} min) {warm_rss:.0f} MiB, "
          f"end {end_rss:.0f} MiB: {growth:+.2f} % after warm-up")
    print(f"after the load: running {counts[0]:g}, waiting {counts[1]:g}")
    print("outcomes: " + ", ".join(f"{result} {n}" for result, n in by_result.most_common()))
    print("latency of completed requests (s), minute by minute:")
    print(f"{'minute':>6} {'done':>6} {'p50':>7} {'p99':>7}")
    per_minute = defaultdict(list)
    for o in outcomes:
        if o.result == "ok":
            per_minute[int(o.started // 60)].append(o.seconds)
    for minute in sorted(per_minute):
        values = np.array(per_minute[minute])
        print(f"{minute + 1:>6} {len(values):>6} {np.percentile(values, 50):>7.2f} {np.percentile(values, 99):>7.2f}")
    checks = {"RSS growth after warm-up < 5 %": growth < 5.0, "0 leaked sequences": counts == (0, 0),
              "0 5xx": server_errors == 0, "no failed request": all(o.result in ("ok", "disconnected") for o in outcomes)}
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}: {name}")
    return all(checks.values())


async def soak(url: str, pid: int, args) -> bool:
    outcomes: list[Outcome] = []
    rss: list[tuple[float, float]] = []
    started_at = time.monotonic()
    deadline = started_at + args.minutes * 60
    watcher = asyncio.create_task(watch_rss(pid, started_at, rss, deadline, outcomes))
    await asyncio.gather(*(client_loop(i, url, args, deadline, started_at, outcomes) for i in range(args.clients)))
    await watcher
    counts = await settle(url)
    rss.append((time.monotonic() - started_at, rss_mib(pid)))
    return report(outcomes, rss, args.warmup_minutes * 60, counts, args.minutes)


def main(argv=None) -> int:
    args = parse_args(argv)
    process = None
    url, pid = args.base_url, args.pid
    if url is None:
        process, url = start_server(args)
        pid = process.pid
    try:
        register_trie(url)
        print(f"soak: {args.clients} clients for {args.minutes:g} min against {url} (server pid {pid})", flush=True)
        passed = asyncio.run(soak(url, pid, args))
    finally:
        if process is not None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(120)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
