"""`make abuse`: hostile and heavy requests beside plain traffic; how long do the plain ones wait, and does the
memory come back?

Starts `longserve serve` on loopback (as the outside probe ran it: --kv-cache-memory 3 --max-model-len 4096),
then a prober sends a plain chat (8 tokens, greedy) and a cached regex every 1.5 s:
1. for --seconds alone (the baseline), after a warm-up;
2. for as long again while every hostile request below runs at once (or until they have all ended);
then the server idles --idle-seconds. It prints the plain requests' p50 / p99 / max latency in each phase, each
hostile request's status and time, the server's RSS (and its grammar workers') at start, after warm-up, after
the load and idle, and PASS / FAIL against the targets: no plain request delayed more than 10 s past the
baseline's worst; idle RSS after the load within 20 % of idle RSS after warm-up. Traffic goes to 127.0.0.1 only.

    python benchmarks/abuse.py --seconds 60 --idle-seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from soak import rss_mib, start_server  # noqa: E402  (the same server start and RSS reading as `make soak`)

MODEL = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def optional_literals(count: int) -> str:
    return "root ::= " + " ".join(['"a"?'] * count)


def tool(index: int, description: str = "a tool") -> dict:
    return {"type": "function", "function": {"name": f"tool_{index}", "description": description, "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "maxLength": 20}}, "required": ["x"]}}}


def ask(content: str, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 16, **fields}


def hostile_requests() -> list[tuple[str, str, str, bytes | dict]]:
    """(label, method, path, body): each case the outside probe found holding others back."""
    text = "lorem ipsum dolor sit amet " * 40_000  # about 1 MB
    cases = [(f"grammar: 1,000 optional literals #{i}", "POST", COMPLETIONS,
              {"model": MODEL, "prompt": "Answer:", "max_tokens": 8, "structured_outputs": {"grammar": optional_literals(1000)}})
             for i in range(6)]
    cases += [
        ("schema: enum of 100k strings", "POST", CHAT,
         ask("Pick one.", response_format={"type": "json_schema", "json_schema": {"name": "e", "schema": {
             "enum": [f"item{i:06d}" for i in range(100_000)]}}})),
        ("choice: 10k of 120 characters", "POST", COMPLETIONS,
         {"model": MODEL, "prompt": "Pick:", "max_tokens": 8, "structured_outputs": {"choice": [f"{i:06d}" + "x" * 114 for i in range(10_000)]}}),
        ("regex: 60k alternatives", "POST", COMPLETIONS,
         {"model": MODEL, "prompt": "Word:", "max_tokens": 8, "structured_outputs": {"regex": "|".join(f"w{i}x" for i in range(60_000))}}),
        ("schema: pattern (.*){1,32000} + maxLength", "POST", CHAT,
         ask("Reply.", n=2, seed=3, temperature=1.0, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {
             "type": "string", "pattern": "(.*){1,32000}", "maxLength": 12}}})),
        ("schema: pattern (.*){1,32000}", "POST", CHAT,
         ask("Reply.", seed=3, temperature=1.0, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {
             "type": "string", "pattern": "(.*){1,32000}"}}})),
        ("128 tools, required", "POST", CHAT, ask("Call one.", tools=[tool(i) for i in range(128)], tool_choice="required")),
        ("a 14 MB tool description", "POST", CHAT, ask("Call it.", tools=[tool(0, "d" * 14_000_000)])),
        ("15 NBCE contexts of 1 MB", "POST", COMPLETIONS,
         {"model": MODEL, "prompt": "Summary:", "max_tokens": 8, "contexts": [text] * 15}),
        ("a 15 MB prompt", "POST", COMPLETIONS, {"model": MODEL, "prompt": text * 15, "max_tokens": 8}),
        ("a 60 MB body (over --max-body-bytes)", "POST", COMPLETIONS, b'{"prompt": "' + b"a" * 60_000_000 + b'"}'),
        ("trie upload: 1M keys", "PUT", "/v1/tries/abuse-kb",
         "\n".join(json.dumps({"key": f"key {i:07d}", "value": i}) for i in range(1_000_000)).encode()),
    ]
    return cases


@dataclass
class Timed:
    label: str
    started: float
    seconds: float
    status: str


async def send(client: httpx.AsyncClient, label: str, method: str, path: str, body, origin: float) -> Timed:
    started = time.monotonic()
    try:
        if isinstance(body, bytes):
            reply = await client.request(method, path, content=body, headers={"content-type": "application/json"})
        else:
            reply = await client.request(method, path, json=body)
        status = str(reply.status_code)
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    return Timed(label, started - origin, time.monotonic() - started, status)


async def probe(client: httpx.AsyncClient, until, origin: float, results: list[Timed]) -> None:
    """A plain chat and a cached regex every 1.5 s while `until()` is False."""
    plain = ask("Say hi.", max_tokens=8, temperature=0)
    regex = {"model": MODEL, "prompt": "Phone:", "max_tokens": 8, "structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}}
    while not until():
        results.extend(await asyncio.gather(send(client, "plain chat", "POST", CHAT, plain, origin),
                                            send(client, "cached regex", "POST", COMPLETIONS, regex, origin)))
        await asyncio.sleep(1.5)


def rss_with_workers(pid: int) -> tuple[float, float]:
    """The server's RSS and its grammar workers' together (MiB)."""
    children = [int(child) for child in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    workers = 0.0
    for child in children:
        try:
            workers += rss_mib(child)
        except (OSError, RuntimeError):
            pass
    return rss_mib(pid), workers


def latency_row(name: str, results: list[Timed]) -> str:
    seconds = np.array([r.seconds for r in results if r.status == "200"]) if results else np.array([])
    failed = sum(r.status != "200" for r in results)
    if not len(seconds):
        return f"{name:<22} {'0':>5} {'-':>7} {'-':>7} {'-':>7} {failed:>7}"
    return (f"{name:<22} {len(seconds):>5} {np.percentile(seconds, 50):>7.2f} {np.percentile(seconds, 99):>7.2f} "
            f"{seconds.max():>7.2f} {failed:>7}")


async def run(url: str, pid: int, args) -> bool:
    rss = {"start": rss_with_workers(pid)}
    timeout = httpx.Timeout(600, connect=30)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        origin = time.monotonic()
        warm_until = origin + args.warmup_seconds
        await probe(client, lambda: time.monotonic() > warm_until, origin, [])
        await asyncio.sleep(args.idle_seconds)
        rss["after warm-up, idle"] = rss_with_workers(pid)
        baseline: list[Timed] = []
        base_until = time.monotonic() + args.seconds
        await probe(client, lambda: time.monotonic() > base_until, origin, baseline)
        hostile_started = time.monotonic()
        hostile = [asyncio.create_task(send(client, label, method, path, body, origin))
                   for label, method, path, body in hostile_requests() if args.only in label]
        loaded: list[Timed] = []
        load_until = hostile_started + args.seconds
        await probe(client, lambda: time.monotonic() > load_until and all(t.done() for t in hostile), origin, loaded)
        ended = [await task for task in hostile]
        rss["after the load"] = rss_with_workers(pid)
        await asyncio.sleep(args.idle_seconds)
        rss["after the load, idle"] = rss_with_workers(pid)
    print(f"\n{'plain requests':<22} {'n':>5} {'p50 s':>7} {'p99 s':>7} {'max s':>7} {'failed':>7}")
    for kind in ("plain chat", "cached regex"):
        print(latency_row(f"{kind}, alone", [r for r in baseline if r.label == kind]))
        print(latency_row(f"{kind}, beside", [r for r in loaded if r.label == kind]))
    print(f"\n{'hostile request':<42} {'status':>10} {'sent at s':>10} {'took s':>8}")
    for timed in ended:
        print(f"{timed.label:<42} {timed.status:>10} {timed.started - (hostile_started - origin):>10.1f} {timed.seconds:>8.1f}")
    print(f"\n{'RSS (MiB)':<22} {'server':>8} {'grammar workers':>16}")
    for moment, (server, workers) in rss.items():
        print(f"{moment:<22} {server:>8.0f} {workers:>16.0f}")
    worst_alone = max((r.seconds for r in baseline), default=0.0)
    worst_beside = max((r.seconds for r in loaded), default=0.0)
    warm, idle = rss["after warm-up, idle"][0], rss["after the load, idle"][0]
    checks = {f"no plain request delayed > 10 s (worst {worst_beside:.1f} s beside, {worst_alone:.1f} s alone)":
              worst_beside - worst_alone <= 10.0,
              "every plain request answered": all(r.status == "200" for r in loaded + baseline),
              f"idle RSS after the load within 20 % of after warm-up ({idle:.0f} vs {warm:.0f} MiB)": idle <= 1.2 * warm,
              "no hostile request got a 5xx but a 503 busy": all(not t.status.startswith("5") or t.status == "503" for t in ended)}
    print()
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}: {name}")
    return all(checks.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="abuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="the baseline, and the least the hostile phase lasts")
    parser.add_argument("--warmup-seconds", type=float, default=30.0)
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle time before each RSS reading at rest")
    parser.add_argument("--only", default="", help="send only the hostile requests whose label holds this text")
    parser.add_argument("--port", type=int, default=8401)
    parser.add_argument("--server-args", default="--kv-cache-memory 3 --max-model-len 4096 --log-level warning")
    args = parser.parse_args(argv)
    from longserve.server.engine.native.loading import speed_flags

    print(f"abuse: {os.cpu_count()} CPUs, flags {speed_flags()}; server flags: {args.server_args}", flush=True)
    process, url = start_server(args)
    try:
        passed = asyncio.run(run(url, process.pid, args))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(120)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
