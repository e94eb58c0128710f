"""How long the CPU image takes to answer, and how big it is.

    python benchmarks/image_start.py [--image longserve:cpu] [--tool podman]    (after `make image`)

Starts the image with fresh volumes for the model cache and /data, on host networking and a free port, and
prints the image's size, the seconds from `run` to a healthy /health, and to the first answered completion.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
import urllib.request
import uuid

from compare_engines import free_port  # benchmarks/, on the path when run as a script


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=5).status == 200
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="image_start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="longserve:cpu")
    parser.add_argument("--tool", default=shutil.which("podman") and "podman" or "docker")
    args = parser.parse_args(argv)
    size = subprocess.run([args.tool, "image", "inspect", "-f", "{{.Size}}", args.image], capture_output=True, text=True,
                          check=True).stdout.strip()
    suffix, port = uuid.uuid4().hex[:8], free_port()
    name, volumes = f"longserve-start-{suffix}", [f"longserve-cache-{suffix}", f"longserve-data-{suffix}"]
    started = time.perf_counter()
    subprocess.run([args.tool, "run", "-d", "--name", name, "--network", "host", "-v", f"{volumes[0]}:/home/longserve/.cache",
                    "-v", f"{volumes[1]}:/data", args.image, "--port", str(port)], check=True, capture_output=True)
    try:
        base = f"http://127.0.0.1:{port}"
        while not healthy(f"{base}/health"):
            time.sleep(0.2)
        to_healthy = time.perf_counter() - started
        body = json.dumps({"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 4}).encode()
        request = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        json.load(urllib.request.urlopen(request, timeout=600))
        to_answer = time.perf_counter() - started
    finally:
        subprocess.run([args.tool, "rm", "-f", name], capture_output=True)
        subprocess.run([args.tool, "volume", "rm", "-f", *volumes], capture_output=True)
    print(f"{args.image}: {int(size) / 1e9:.2f} GB; run to healthy {to_healthy:.1f} s, to the first answer {to_answer:.1f} s")


if __name__ == "__main__":
    main()
