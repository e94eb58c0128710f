"""Load scenarios against a longserve server: TTFT under mixed load, prefix reuse, NBCE, memory.

    python benchmarks/native_load.py --scenario mixed [--cwd /other/checkout] [--server-args "..."]

Starts `python -m longserve.server.cli serve` on a free 127.0.0.1 port (run in --cwd,
so another checkout's code can be measured), waits for GET /health, runs one
scenario with concurrent streaming clients, samples the server's RSS (with
its children) every 0.2 s, prints a markdown table, writes DIR/SCENARIO.json
and stops the server. Prompts are cut from tinyshakespeare, trimmed to exact
token counts with the model's tokenizer. Every request streams with
temperature 0 and include_usage; TTFT is the time to the first chunk with
text. cached_tokens comes from usage.prompt_tokens_details ("-" when absent).

Scenarios:
  mixed        one --long-tokens completion and --short chat questions sent
               at the same moment: short chats' TTFT p50/max, the long
               prompt's TTFT (its prefill) and the wall time.
  prefix       one --doc-tokens document, then 5 questions about it, one
               after another: TTFT and cached_tokens each; cold (first), warm
               (median of the other four) and warm/cold.
  nbce-prefix  NBCE (`contexts`) over --docs documents of --doc-tokens-nbce
               tokens, 5 questions one after another: as prefix.
  memory       two fresh servers: 32 concurrent 2000-token prompts, then 4
               concurrent 16000-token prompts: idle and peak RSS, wall time.
Prompts past the trained length get --max-model-len and an NTK --position
unless --server-args already sets them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from revisions import cli_module  # benchmarks/, on the path when run as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TEXT = Path("/work/shared/data/tinyshakespeare.txt").read_text()
QUESTIONS = ["Who speaks first in this passage?", "What do the citizens want?", "Name one character who is mentioned.",
             "Which city is this set in?", "Is the mood calm or angry?"]
GIB = 1024**3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", required=True, choices=["mixed", "prefix", "nbce-prefix", "memory"])
    parser.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--server-args", default="", help="extra flags for `longserve serve` (split with shlex)")
    parser.add_argument("--cwd", default=str(REPO), help="directory the server runs in (its code) (default the repo root)")
    parser.add_argument("--out", default="results/native-load")
    parser.add_argument("--long-tokens", type=int, default=16000, help="mixed: the long prompt")
    parser.add_argument("--short", type=int, default=16, help="mixed: short chat requests")
    parser.add_argument("--doc-tokens", type=int, default=16000, help="prefix: the document")
    parser.add_argument("--docs", type=int, default=16, help="nbce-prefix: contexts")
    parser.add_argument("--doc-tokens-nbce", type=int, default=1500, help="nbce-prefix: tokens per context")
    parser.add_argument("--request-timeout", type=float, default=1200, help="seconds per request")
    parser.add_argument("--run-limit", type=float, default=3600, help="seconds per server run; later requests fail")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def token_text(tokenizer, start: int, n_tokens: int) -> tuple[str, int]:
    """Text from character `start` that encodes to exactly n_tokens tokens (or as close as possible), and its end."""
    ids = tokenizer.encode(TEXT[start:start + n_tokens * 6], add_special_tokens=False)
    take = n_tokens
    for _ in range(8):
        text = tokenizer.decode(ids[:take])
        got = len(tokenizer.encode(text, add_special_tokens=False))
        if got == n_tokens:
            break
        take += n_tokens - got
    if start + len(text) > len(TEXT):
        raise SystemExit(f"the text ends before {n_tokens} tokens from character {start}")
    return text, start + len(text)


def rss_bytes(pid: int) -> int:
    try:
        import psutil
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())
    except ImportError:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    except Exception:
        return 0


class Server:
    """`longserve serve` in a subprocess, with an RSS sampler thread."""

    def __init__(self, args, extra: list[str], log: Path):
        from longserve.server.models import DEFAULT_MODEL, resolve
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", cli_module(args.cwd), "serve", "--model", str(resolve(DEFAULT_MODEL)),
                        "--served-model-name", DEFAULT_MODEL, "--host", "127.0.0.1", "--port", str(self.port),
                        "--dtype", args.dtype, *extra]
        self.log = open(log, "w")
        self.process = subprocess.Popen(self.command, cwd=args.cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()
        self.started = time.perf_counter()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.stopped.wait(0.2):
            self.samples.append((time.perf_counter() - self.started, rss_bytes(self.process.pid)))

    def wait_healthy(self, timeout: float = 600) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode} before it was ready; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server was not ready in {timeout:.0f} s; see {self.log.name}")

    def peak_since(self, t: float) -> int:
        return max((rss for at, rss in self.samples if at >= t), default=0)

    def stop(self) -> None:
        self.stopped.set()
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


async def stream(client: httpx.AsyncClient, url: str, name: str, body: dict, timeout: float) -> dict:
    """One streaming request: TTFT, end-to-end time, usage, or the error."""
    endpoint = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    body = {**body, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    result = {"name": name, "error": None, "ttft_s": None, "e2e_s": None, "text": "", "usage": None}
    started = time.perf_counter()
    first_choice = None

    async def read():
        nonlocal first_choice
        async with client.stream("POST", url + endpoint, json=body) as response:
            if response.status_code != 200:
                result["error"] = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result["error"] = f"error event: {json.dumps(chunk['error'])[:300]}"
                for choice in chunk.get("choices") or []:
                    first_choice = first_choice or time.perf_counter()
                    text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                    if text and result["ttft_s"] is None:
                        result["ttft_s"] = time.perf_counter() - started
                    result["text"] += text
                if chunk.get("usage"):
                    result["usage"] = chunk["usage"]

    try:
        await asyncio.wait_for(read(), timeout=max(timeout, 0.001))
    except asyncio.TimeoutError:
        result["error"] = f"timed out after {timeout:.0f} s (--request-timeout or --run-limit)"
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["e2e_s"] = time.perf_counter() - started
    if result["ttft_s"] is None and first_choice is not None:
        result["ttft_s"] = first_choice - started
    usage = result["usage"] or {}
    result["prompt_tokens"] = usage.get("prompt_tokens")
    result["completion_tokens"] = usage.get("completion_tokens")
    result["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return result


async def send(server: Server, requests: list[tuple[str, dict]], args, deadline: float, concurrent: bool) -> list[dict]:
    """Send (name, body) requests all at once (long one first) or one after another."""
    limits = httpx.Limits(max_connections=len(requests) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        def one(name, body):
            return stream(client, server.url, name, body, min(args.request_timeout, deadline - time.perf_counter()))
        if concurrent:
            return list(await asyncio.gather(*(one(name, body) for name, body in requests)))
        return [await one(name, body) for name, body in requests]


def long_args(args, extra: list[str], tokens: int, trained_len: int) -> list[str]:
    """Add --max-model-len and an NTK --position for prompts past the trained length, unless given."""
    if tokens <= trained_len:
        return extra
    if "--max-model-len" not in extra:
        extra = [*extra, "--max-model-len", str(max(20000, tokens + 256))]
    if "--position" not in extra:
        extra = [*extra, "--position", json.dumps({"type": "ntk", "factor": 4})]
    return extra


def run_server(args, label: str, extra: list[str], make_requests, concurrent: bool) -> dict:
    """One fresh server: start, wait, send, stop; figures with RSS and wall time."""
    server = Server(args, extra, Path(args.out) / f"{label}.log")
    print(f"server ({label}): cd {shlex.quote(args.cwd)} && {shlex.join(server.command)}", file=sys.stderr)
    try:
        ready_s = server.wait_healthy()
        idle = rss_bytes(server.process.pid)
        requests = make_requests()
        started = time.perf_counter()
        results = asyncio.run(send(server, requests, args, started + args.run_limit, concurrent))
        wall = time.perf_counter() - started
        peak = server.peak_since(started - server.started)
        time.sleep(0.5)
        return {"label": label, "server_command": server.command, "ready_s": ready_s, "wall_s": wall,
                "idle_rss_gib": idle / GIB, "peak_rss_gib": max(peak, idle) / GIB, "requests": results,
                "failures": sum(r["error"] is not None for r in results), "rss_samples": server.samples}
    except RuntimeError as exc:
        return {"label": label, "server_command": server.command, "error": str(exc), "requests": [], "failures": 1}
    finally:
        server.stop()


def fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def scenario_mixed(args, tok, extra, trained_len) -> tuple[list[dict], list[str]]:
    def make():
        long_doc, end = token_text(tok, 0, args.long_tokens)
        requests = [("long", {"prompt": long_doc + "\n\nSummary:", "max_tokens": 16})]
        for i in range(args.short):
            lines = "\n".join(TEXT[end + 5000 * i:].splitlines()[1:4])
            requests.append((f"short-{i}", {"messages": [{"role": "user", "content": f"Summarise in one line:\n{lines}"}],
                                             "max_tokens": 16}))
        return requests
    run = run_server(args, "mixed", long_args(args, extra, args.long_tokens + 32, trained_len), make, concurrent=True)
    shorts = [r["ttft_s"] for r in run["requests"] if r["name"] != "long" and r["ttft_s"] is not None]
    long_run = next((r for r in run["requests"] if r["name"] == "long"), {})
    run["summary"] = {"short_ttft_p50_s": statistics.median(shorts) if shorts else None, "short_ttft_max_s": max(shorts, default=None),
                      "long_ttft_s": long_run.get("ttft_s"), "long_e2e_s": long_run.get("e2e_s"), "wall_s": run.get("wall_s"),
                      "long_prompt_tokens": long_run.get("prompt_tokens"), "failures": run["failures"]}
    rows = ["| metric | value |", "| --- | ---: |"] + [f"| {k} | {fmt(v)} |" for k, v in run["summary"].items()]
    return [run], rows


def scenario_questions(args, tok, extra, trained_len, nbce: bool) -> tuple[list[dict], list[str]]:
    def make():
        if nbce:
            docs, end = [], 0
            for _ in range(args.docs):
                doc, end = token_text(tok, end, args.doc_tokens_nbce)
                docs.append(doc)
            return [(f"q{i + 1}", {"contexts": docs, "prompt": f"Question: {q}\nAnswer:", "max_tokens": 8})
                    for i, q in enumerate(QUESTIONS)]
        doc, _ = token_text(tok, 0, args.doc_tokens)
        return [(f"q{i + 1}", {"prompt": f"{doc}\n\nQuestion: {q}\nAnswer:", "max_tokens": 8}) for i, q in enumerate(QUESTIONS)]
    if nbce:
        extra = extra if "--max-num-seqs" in extra else [*extra, "--max-num-seqs", "32"]
        extra = long_args(args, extra, args.doc_tokens_nbce + 32, trained_len)
    else:
        extra = long_args(args, extra, args.doc_tokens + 32, trained_len)
    run = run_server(args, args.scenario, extra, make, concurrent=False)
    ttfts = [r["ttft_s"] for r in run["requests"]]
    cold = ttfts[0] if ttfts else None
    warm_ttfts = [t for t in ttfts[1:] if t is not None]
    warm = statistics.median(warm_ttfts) if warm_ttfts else None
    run["summary"] = {"cold_ttft_s": cold, "warm_ttft_median_s": warm, "warm_over_cold": warm / cold if warm and cold else None,
                      "failures": run["failures"], "wall_s": run.get("wall_s")}
    rows = ["| question | TTFT s | e2e s | prompt_tokens | cached_tokens | completion_tokens | error |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    rows += [f"| {r['name']} | {fmt(r['ttft_s'])} | {fmt(r['e2e_s'])} | {fmt(r['prompt_tokens'])} | {fmt(r['cached_tokens'])} | "
             f"{fmt(r['completion_tokens'])} | {r['error'] or ''} |" for r in run["requests"]]
    rows += ["", "| cold TTFT s | warm TTFT median s | warm/cold |", "| ---: | ---: | ---: |",
             f"| {fmt(cold)} | {fmt(warm)} | {fmt(run['summary']['warm_over_cold'], 3)} |"]
    return [run], rows


def scenario_memory(args, tok, extra, trained_len) -> tuple[list[dict], list[str]]:
    extra = extra if "--max-num-seqs" in extra else [*extra, "--max-num-seqs", "32"]
    runs = []
    for count, tokens in ((32, 2000), (4, 16000)):
        def make(count=count, tokens=tokens):
            requests, end = [], 0
            for i in range(count):
                doc, end = token_text(tok, end, tokens)
                requests.append((f"{tokens}-{i}", {"prompt": doc, "max_tokens": 16}))
            return requests
        label = f"memory-{count}x{tokens}"
        runs.append(run_server(args, label, long_args(args, extra, tokens + 16, trained_len), make, concurrent=True))
    rows = ["| sub-run | idle RSS GiB | peak RSS GiB | wall s | failures |", "| --- | ---: | ---: | ---: | ---: |"]
    for run in runs:
        run["summary"] = {k: run.get(k) for k in ("idle_rss_gib", "peak_rss_gib", "wall_s", "failures")}
        rows.append(f"| {run['label']} | {fmt(run.get('idle_rss_gib'))} | {fmt(run.get('peak_rss_gib'))} | "
                    f"{fmt(run.get('wall_s'), 1)} | {run['failures']} |")
    return runs, rows


def main(argv=None) -> None:
    args = parse_args(argv)
    args.cwd = str(Path(args.cwd).resolve())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    from longserve.server.models import DEFAULT_MODEL, resolve
    model_path = resolve(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(str(model_path))
    trained_len = json.loads((model_path / "config.json").read_text()).get("max_position_embeddings", 8192)
    extra = shlex.split(args.server_args)
    print(f"# native-load {args.scenario}: cd {shlex.quote(os.getcwd())} && "
          f"{shlex.join([sys.executable, sys.argv[0], *(sys.argv[1:] if argv is None else argv)])}")
    if args.scenario == "mixed":
        runs, rows = scenario_mixed(args, tok, extra, trained_len)
    elif args.scenario == "memory":
        runs, rows = scenario_memory(args, tok, extra, trained_len)
    else:
        runs, rows = scenario_questions(args, tok, extra, trained_len, nbce=args.scenario == "nbce-prefix")
    for run in runs:
        if run.get("error"):
            rows.append(f"\n{run['label']}: server failed: {run['error']}")
        for r in run["requests"]:
            if r["error"]:
                rows.append(f"\nFAILED {run['label']}/{r['name']}: {r['error']}")
    print("\n".join(rows))
    path = Path(args.out) / f"{args.scenario}.json"
    path.write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
