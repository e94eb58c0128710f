"""KgCLUE-style one-hop KBQA through trie-constrained generation.

    longserve kgclue --base-url URL --kb kb.tsv --questions questions.jsonl [--shots 4]

Reads the knowledge base as tab-separated triples (subject, predicate,
object) and the questions as JSON lines {"id", "question", "answer": "S ||| P ||| O"}.
Registers the base on the server (key "S ||| P", value: the list of its
objects), then asks every question with a few-shot prompt, the answer
constrained to the base's keys. The first --shots questions are the examples
and are not scored.

Reports: validity (the share of answers that are keys), exact match of S, P
and O (O matches when the gold object is among the key's objects),
character-LCS F1 on O, and latency percentiles; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from longserve.clients.server_client import Server

SEPARATOR = " ||| "
INSTRUCTION = "根据知识库回答问题，写出“主语 ||| 谓语”。Answer with the knowledge-base key \"subject ||| predicate\".\n\n"


def read_triples(path: Path) -> dict[str, list[str]]:
    """key "S ||| P" -> its objects, in file order; bad lines stop with their number."""
    objects: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3 or not all(p.strip() for p in parts):
            raise SystemExit(f"{path}:{number}: expected subject<TAB>predicate<TAB>object, got {line!r}")
        subject, predicate, obj = (p.strip() for p in parts)
        objects.setdefault(subject + SEPARATOR + predicate, []).append(obj)
    return objects


def read_questions(path: Path) -> list[dict]:
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        item = json.loads(line)
        if not {"question", "answer"} <= set(item) or item["answer"].count(SEPARATOR) != 2:
            raise SystemExit(f"{path}:{number}: expected {{\"question\", \"answer\": \"S ||| P ||| O\"}}")
        questions.append(item)
    return questions


def lcs_f1(predicted: str, gold: str) -> float:
    """F1 of the longest common character subsequence."""
    if not predicted or not gold:
        return 0.0
    previous = [0] * (len(gold) + 1)
    for a in predicted:
        current = [0]
        for j, b in enumerate(gold):
            current.append(previous[j] + 1 if a == b else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def few_shot_prompt(shots: list[dict], question: str) -> str:
    examples = "".join(f"问题：{s['question']}\n答案：{s['answer'].rsplit(SEPARATOR, 1)[0]}\n\n" for s in shots)
    return f"{INSTRUCTION}{examples}问题：{question}\n答案："


def register(server: Server, name: str, objects: dict[str, list[str]]) -> dict:
    lines = "".join(json.dumps({"key": key, "value": values}, ensure_ascii=False) + "\n" for key, values in objects.items())
    response = httpx.put(f"{server.base_url}/tries/{name}", content=lines.encode("utf-8"), headers=server.headers(), timeout=600)
    if response.status_code != 200:
        raise SystemExit(f"registering the base failed: HTTP {response.status_code}: {response.text[:300]}")
    return response.json()


def score(item: dict, reply: dict) -> dict:
    choice = reply["choices"][0]
    gold_subject, gold_predicate, gold_object = item["answer"].split(SEPARATOR)
    key, values = choice.get("key"), choice.get("value") or []
    subject, _, predicate = (key or "").partition(SEPARATOR)
    return {
        "id": item.get("id"), "question": item["question"], "gold": item["answer"], "key": key, "objects": values,
        "valid": key is not None, "em_s": subject == gold_subject, "em_p": predicate == gold_predicate,
        "em_o": gold_object in values, "f1_o": max((lcs_f1(v, gold_object) for v in values), default=0.0),
        "finish_reason": choice["finish_reason"],
    }


def run(args: argparse.Namespace) -> dict:
    server = Server.connect(args.base_url, args.model, args.api_key)
    objects = read_triples(args.kb)
    questions = read_questions(args.questions)
    shots, asked = questions[: args.shots], questions[args.shots :][: args.limit]
    stats = register(server, args.name, objects)
    print(f"registered {stats['keys']} keys as {args.name!r} in {stats['build_seconds']} s ({stats['bytes_per_key']} bytes/key)", file=sys.stderr)
    records = []
    for item in tqdm(asked, desc="kgclue", unit="question"):
        started = time.perf_counter()
        reply = server.complete(few_shot_prompt(shots, item["question"]), None, max_tokens=args.max_tokens,
                                constraint={"trie": args.name})
        record = score(item, reply)
        record["seconds"] = round(time.perf_counter() - started, 3)
        records.append(record)
    return {"kind": "kgclue", "model": server.model, "trie": stats, "shots": len(shots), "records": records, "summary": summarize(records)}


def summarize(records: list[dict]) -> dict:
    count = len(records)
    seconds = sorted(r["seconds"] for r in records)

    def percentile(q: float) -> float:
        return seconds[min(count - 1, int(q * count))] if seconds else 0.0

    share = lambda field: sum(r[field] for r in records) / count if count else 0.0  # noqa: E731
    return {
        "questions": count, "validity": share("valid"), "em_s": share("em_s"), "em_p": share("em_p"), "em_o": share("em_o"),
        "f1_o": statistics.fmean(r["f1_o"] for r in records) if count else 0.0,
        "latency_p50": percentile(0.5), "latency_p90": percentile(0.9), "latency_p99": percentile(0.99),
    }


def add_kgclue_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="model name (default: the server's first model)")
    parser.add_argument("--api-key")
    parser.add_argument("--kb", type=Path, required=True, help="tab-separated triples: subject, predicate, object")
    parser.add_argument("--questions", type=Path, required=True, help='JSON lines {"id", "question", "answer": "S ||| P ||| O"}')
    parser.add_argument("--name", default="kgclue", help="the trie's name on the server")
    parser.add_argument("--shots", type=int, default=4, help="leading questions used as examples, not scored")
    parser.add_argument("--limit", type=int, help="score at most this many questions")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("results"))


def run_kgclue(args: argparse.Namespace) -> None:
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kgclue-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, ensure_ascii=False, indent=1))
    s = result["summary"]
    print(f"questions {s['questions']}  validity {s['validity']:.1%}  EM S {s['em_s']:.1%}  EM P {s['em_p']:.1%}  "
          f"EM O {s['em_o']:.1%}  F1 O {s['f1_o']:.3f}  latency p50 {s['latency_p50']:.2f}s p90 {s['latency_p90']:.2f}s "
          f"p99 {s['latency_p99']:.2f}s")
    print(f"wrote {path}", file=sys.stderr)
