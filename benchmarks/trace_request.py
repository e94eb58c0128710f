"""Which of the project's files one plain chat request runs through, HTTP to sampled token.

    python benchmarks/trace_request.py [--model smollm2-135m-instruct] [--port 8019]

Starts a real `longserve serve` in a child process whose every thread has a
profile hook (set before any thread starts), sends one warm-up request, then
records the files of every Python function called while a second request,
sent through the official openai SDK, runs. Prints them by layer, and marks
the HTTP-layer files a GET /health runs too (transport and middleware).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from compare_engines import wait_healthy  # benchmarks/, on the path when run as a script

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"HTTP layer": "server/", "engine": "server/engine/", "patches": "patches/", "clients": "clients/"}


def serve_traced(record_to: str, serve_args: list[str]) -> None:
    """The child: a profile hook in every thread; SIGUSR1 starts recording, SIGUSR2 writes what was recorded."""
    recording, files = [False], set()

    def hook(frame, event, _arg):
        if recording[0] and event == "call":
            files.add(f"{frame.f_code.co_filename}::{frame.f_code.co_name}")

    def start(*_):
        files.clear()
        recording[0] = True

    def stop(*_):
        recording[0] = False
        Path(record_to).write_text(json.dumps(sorted(files)))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    threading.setprofile(hook)
    sys.setprofile(hook)
    from longserve.server.cli import main

    main(["serve", *serve_args])


def by_layer(calls: list[str], functions: bool) -> dict[str, list[str]]:
    files = {call if functions else call.split("::")[0] for call in calls}
    ours = sorted(str(Path(f).resolve().relative_to(REPO)) for f in files if Path(f.split("::")[0]).resolve().is_relative_to(REPO))
    layers: dict[str, list[str]] = {name: [] for name in LAYERS}
    for path in ours:
        if path.startswith("server/engine/"):
            layers["engine"].append(path)
        else:
            layers.get(next((name for name, prefix in LAYERS.items() if path.startswith(prefix)), ""), []).append(path)
    return layers


def record_calls(child: subprocess.Popen, record: str, work) -> list[str]:
    """The functions the server called (file::name) while `work` ran."""
    child.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    work()
    time.sleep(0.5)  # the engine thread's last step ends after the response
    child.send_signal(signal.SIGUSR2)
    time.sleep(0.5)
    return json.loads(Path(record).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--port", type=int, default=8019)
    parser.add_argument("--functions", action="store_true", help="list each function called, not only its file")
    if sys.argv[1:2] == ["--child"]:  # the child's own flags are longserve serve's
        return serve_traced(sys.argv[2], sys.argv[3:])
    args = parser.parse_args()
    import httpx
    from openai import OpenAI

    record = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    serve_args = ["--model", args.model, "--port", str(args.port), "--host", "127.0.0.1",
                  "--data-dir", tempfile.mkdtemp(prefix="trace-data-")]
    child = subprocess.Popen([sys.executable, __file__, "--child", record, *serve_args], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    base = f"http://127.0.0.1:{args.port}"
    try:
        wait_healthy(base, child)
        client = OpenAI(base_url=f"{base}/v1", api_key="none")
        ask = dict(model=args.model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
        client.chat.completions.create(**ask)  # warm-up: lazy imports and first-use paths
        chat = record_calls(child, record, lambda: client.chat.completions.create(**ask))
        health = record_calls(child, record, lambda: httpx.get(f"{base}/health"))
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)
    every_route = set(by_layer(health, args.functions)["HTTP layer"])  # transport and middleware
    print("one plain chat request (openai SDK, max_tokens 8), HTTP to sampled token; * = also run by GET /health")
    for name, paths in by_layer(chat, args.functions).items():
        starred = sum(p in every_route for p in paths)
        print(f"{name}: {len(paths)}" + (f" ({len(paths) - starred} without the * ones)" if starred else ""))
        for path in paths:
            print(f"  {path}{' *' if path in every_route else ''}")


if __name__ == "__main__":
    main()
