"""The sampler's cost per call over a batch of logits [rows, 49152], by case; with --against REV, beside the
sampler as it was at that git revision (loaded from `git show`), side by side in one run.

    python benchmarks/sampler.py --against e9a7c05

Cases: temperature only; top_p 0.9 on peaked logits (randn x 8, like a real model's) and on flat ones (randn,
the worst case: thousands of tokens in the top-p set); presence, frequency and repetition penalties with 5
logprobs; greedy with 5 logprobs. Rows have a 300-token prompt and 64 output tokens. Each figure is the
best of two runs of 20 calls.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import torch
from revisions import old_names_to_new  # benchmarks/, on the path when run as a script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from longserve.server.engine.base import SamplingParams  # noqa: E402
from longserve.server.engine.native import sampler as current  # noqa: E402
from longserve.server.engine.native.loading import speed_flags  # noqa: E402
from longserve.server.engine.native.sequence import Sequence  # noqa: E402

VOCAB = 49152
CASES = [
    ("temperature only", dict(temperature=0.8), 1.0),
    ("peaked logits, top_p 0.9", dict(temperature=0.8, top_p=0.9), 8.0),
    ("flat logits, top_p 0.9", dict(temperature=0.8, top_p=0.9), 1.0),
    ("penalties + logprobs 5", dict(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                                    logprobs=5), 1.0),
    ("greedy + logprobs 5", dict(temperature=0.0, logprobs=5), 1.0),
]


def sampler_at(revision: str):
    source = subprocess.run(["git", "show", f"{revision}:server/engine/native/sampler.py"], capture_output=True, text=True,
                            check=True).stdout
    if "from server." in source:  # before the longserve package: its imports name this tree's modules the old way
        old_names_to_new()
    path = os.path.join(tempfile.mkdtemp(), "sampler_then.py")
    with open(path, "w") as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location("sampler_then", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch(rows: int, tokenizer, params: dict) -> list[Sequence]:
    seqs = []
    for row in range(rows):
        seq = Sequence("r", row, list(range(100, 400)), SamplingParams(**params), lambda delta: None,
                       tokenizer.backend_tokenizer, frozenset({2}))
        seq.output_ids = list(range(500, 564))
        seq.generator = None  # what samplers before the counter-based seeds read (--against)
        seqs.append(seq)
    return seqs


def best_ms(module, logits, seqs) -> float:
    generator = torch.Generator().manual_seed(0)
    runs = []
    for _ in range(2):
        started = time.perf_counter()
        for _ in range(20):
            module.sample(logits, seqs, generator)
        runs.append((time.perf_counter() - started) / 20 * 1000)
    return min(runs)


def main(argv=None) -> None:
    from transformers import AutoTokenizer

    from longserve.server.models import DEFAULT_MODEL, resolve

    parser = argparse.ArgumentParser(prog="sampler", description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", help="a git revision whose sampler to time beside this one")
    parser.add_argument("--rows", default="1,8,32")
    args = parser.parse_args(argv)
    then = sampler_at(args.against) if args.against else None
    tokenizer = AutoTokenizer.from_pretrained(resolve(DEFAULT_MODEL))
    print(f"sampler: {torch.get_num_threads()} threads, CPU flags {speed_flags()}")
    header = f"{'rows':>4} {'case':<28} {'now ms':>8}"
    print(header + (f" {args.against + ' ms':>14} {'now/then':>9}" if then else ""))
    torch.manual_seed(0)
    for rows in [int(r) for r in args.rows.split(",")]:
        for name, params, spread in CASES:
            logits, seqs = torch.randn(rows, VOCAB) * spread, batch(rows, tokenizer, params)
            now = best_ms(current, logits, seqs)
            line = f"{rows:>4} {name:<28} {now:>8.2f}"
            if then is not None:
                earlier = best_ms(then, logits, batch(rows, tokenizer, params))
                line += f" {earlier:>14.2f} {now / earlier:>9.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
