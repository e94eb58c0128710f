"""Knowledge-base build time, memory and per-step masking cost at growing sizes.

    python benchmarks/tries.py --keys 10k,100k,1M

Keys look like KgCLUE's "subject ||| predicate": synthetic subjects (Chinese
and Latin, some with bracketed disambiguation, some prefixes of others) and
a few hundred predicates. Build time covers tokenizing with the bundled
model's tokenizer, the trie and the key/value blobs. The step cost is one
`mask_logits` over a full-vocabulary row, at the root (the widest node) and
along random key walks, as the engine pays it before each sampled token.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from longserve.server.engine.base import KeyConstraint
from longserve.server.engine.native.constraint import KeyState, mask_logits
from longserve.server.knowledge import Limits, build

SYLLABLES = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严"
PREDICATES = ["出生地", "作者", "演唱", "所属国家", "首都", "面积", "人口", "作者简介", "别名", "发行时间", "capital of",
              "population", "author", "birth place", "river", "founded", "founder", "genre", "language", "currency"]
KINDS = ["", "", "", "（歌曲）", "（小说）", "（电影）", "（人物）"]


def synthetic_entries(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    predicates = PREDICATES + [f"属性{i}" for i in range(300)]
    entries, seen = [], set()
    while len(entries) < count:
        if rng.random() < 0.5:
            subject = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 5)))
        else:
            subject = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 10))).title()
        key = f"{subject}{rng.choice(KINDS)} ||| {rng.choice(predicates)}"
        if key not in seen:
            seen.add(key)
            entries.append({"key": key, "value": f"object of {key}"})
    return entries


def step_cost_ms(base, vocab: int, walks: int = 200, seed: int = 0) -> tuple[float, float]:
    """(ms at the root, mean ms along random walks) for one masking step."""
    logits = torch.zeros(1, vocab)
    constraint = KeyConstraint(base.trie, end_token=0)
    root = KeyState(constraint)
    mask_logits(logits, [root])  # warm-up
    started = time.perf_counter()
    for _ in range(20):
        mask_logits(logits, [root])
    at_root = (time.perf_counter() - started) / 20 * 1000
    rng = np.random.default_rng(seed)
    steps, elapsed = 0, 0.0
    for _ in range(walks):
        state = KeyState(constraint)
        while True:
            started = time.perf_counter()
            mask_logits(logits, [state])
            elapsed += time.perf_counter() - started
            steps += 1
            allowed = state.allowed_tokens(logits.shape[-1]).tolist()
            if state.advance(int(rng.choice(allowed))):
                break
    return at_root, elapsed / steps * 1000


def parse_count(text: str) -> int:
    """'10k' -> 10000, '1M' -> 1000000: decimal, unlike token lengths."""
    text = text.strip()
    scale = {"k": 1000, "K": 1000, "m": 1_000_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("kKmM")) * scale)


def main() -> None:
    from transformers import AutoTokenizer

    from longserve.server.models import DEFAULT_MODEL, resolve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", default="10k,100k,1M", help="sizes; k = 1000, M = 1000000")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for the masking step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [parse_count(part) for part in args.keys.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(str(resolve(DEFAULT_MODEL)))
    print(f"torch threads {torch.get_num_threads()}")
    print(f"{'keys':>9}{'build s':>9}{'tokens/key':>12}{'nodes':>11}{'bytes/key':>11}{'trie bytes/key':>16}{'step ms root':>14}{'step ms walk':>14}")
    for size in sizes:
        entries = synthetic_entries(size)
        base = build("bench", entries, tokenizer, " ", Limits(max_keys=size))
        root_ms, walk_ms = step_cost_ms(base, len(tokenizer))
        print(f"{size:>9}{base.build_seconds:>9.1f}{base.num_tokens / size:>12.1f}{base.trie.num_nodes:>11}"
              f"{base.nbytes / size:>11.1f}{base.trie.nbytes / size:>16.1f}{root_ms:>14.3f}{walk_ms:>14.3f}", flush=True)


if __name__ == "__main__":
    main()
