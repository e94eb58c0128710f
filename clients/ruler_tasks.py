"""RULER's synthetic tasks (Hsieh et al., 2024), written here from the paper's descriptions.

Each task makes a sample of `tokens` tokens: a haystack with what the task
hides in it, a question, and the start of the answer; the references are
the strings a correct answer contains. RULER scores a sample by the share
of its references found in the output (`score`), as a percentage.

- niah_single: one needle, "One of the special magic numbers for KEY is:
  VALUE.", in an essay-like haystack (Shakespeare, clients/data/haystack.txt,
  public domain); asked for KEY's number.
- niah_multikey: four needles with different keys; asked for one of them.
- niah_multivalue: four needles with one key and four values; all four asked.
- niah_multiquery: four needles with different keys; all four asked.
- vt (variable tracking): a chain "VAR A = 12345", "VAR B = A", ... hidden
  in repeated noise sentences; asked which variables hold 12345.
- cwe (common words): a numbered list of words where ten appear 30 times and
  the rest 3 times (a short length lowers the 30, never below 4); asked for
  the ten most common.
- fwe (frequent words): coded words drawn with Zipf frequencies (alpha 2);
  asked for the three most frequent.

RULER's QA tasks need external data sets (SQuAD, HotpotQA) and are left out.
Every random choice comes from the sample's own seeded generator.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HAYSTACK = Path(__file__).parent / "data" / "haystack.txt"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "One of the special magic numbers for {key} is: {value}.\n"
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
ANSWER_TOKENS = {"niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "niah_multiquery": 64, "vt": 40, "cwe": 120, "fwe": 50}


@dataclass
class Sample:
    task: str
    prompt: str
    references: list[str]


def score(output: str, references: list[str]) -> float:
    """The percentage of `references` that `output` contains (case-insensitive), as RULER scores."""
    text = output.lower()
    return 100.0 * sum(reference.lower() in text for reference in references) / len(references)


@lru_cache(maxsize=1)
def haystack_lines() -> list[str]:
    return HAYSTACK.read_text(encoding="utf-8").splitlines(keepends=True)


@lru_cache(maxsize=1)
def vocabulary() -> list[str]:
    """Distinct plain words of the haystack, for keys and the common-words list."""
    words = re.findall(r"\b[a-z]{4,10}\b", HAYSTACK.read_text(encoding="utf-8").lower())
    return sorted(set(words))


def number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def keys(rng: random.Random, count: int) -> list[str]:
    """`count` distinct keys, such as 'quiet-harbour' (two words joined)."""
    chosen: set[str] = set()
    while len(chosen) < count:
        chosen.add("-".join(rng.sample(vocabulary(), 2)))
    return sorted(chosen)


def with_inserts(lines: list[str], inserts: list[str], rng: random.Random) -> str:
    """`lines` with each insert placed between two of them at a random depth."""
    places = sorted(rng.randrange(len(lines) + 1) for _ in inserts)
    out, at = [], 0
    for place, insert in zip(places, inserts):
        out += lines[at:place] + [insert]
        at = place
    return "".join(out + lines[at:])


def filler(kind: str, chars: int) -> list[str]:
    """Haystack lines worth about `chars` characters: essay text, or noise sentences."""
    if kind == "noise":
        return [NOISE] * max(1, chars // len(NOISE))
    lines, total, source = [], 0, haystack_lines()
    while total < chars:  # the text repeats where a length asks for more than it holds
        line = source[len(lines) % len(source)]
        lines.append(line)
        total += len(line)
    return lines


def niah(task: str, rng: random.Random, chars: int) -> Sample:
    names = keys(rng, 4)
    if task == "niah_single":
        needles, asked = [(names[0], number(rng))], [names[0]]
    elif task == "niah_multikey":
        needles, asked = [(name, number(rng)) for name in names], [names[0]]
    elif task == "niah_multivalue":
        needles, asked = [(names[0], number(rng)) for _ in range(4)], [names[0]]
    else:
        needles, asked = [(name, number(rng)) for name in names], names
    body = with_inserts(filler("essay", chars), [NEEDLE.format(key=k, value=v) for k, v in needles], rng)
    what = ", ".join(asked)
    many = len(needles) > 1 and task != "niah_multikey"
    question = (f"What are all the special magic numbers for {what} mentioned in the provided text?" if many
                else f"What is the special magic number for {what} mentioned in the provided text?")
    prompt = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              f"I will quiz you about the numbers afterwards.\n{body}\n{question} "
              f"The special magic number{'s' if many else ''} for {what} mentioned in the provided text "
              f"{'are' if many else 'is'}")
    references = [value for key, value in needles if key in asked]
    return Sample(task, prompt, references)


def variable_tracking(rng: random.Random, chars: int, hops: int = 4) -> Sample:
    names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(hops + 1)]
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}\n"] + [f"VAR {names[i]} = VAR {names[i - 1]}\n" for i in range(1, hops + 1)]
    lines = filler("noise", chars)
    lines += [""] * (len(chain) - len(lines) - 1)  # a length too short for one line between two assignments
    places = sorted(rng.sample(range(len(lines) + 1), len(chain)))  # in order: each assignment after the one it reads
    for offset, (place, line) in enumerate(zip(places, chain)):
        lines.insert(place + offset, line)
    prompt = (f"Memorize and track the chain of variable assignment hidden in the following text.\n\n{''.join(lines)}\n"
              f"Question: Find all variables that are assigned the value {value} in the text above. "
              f"Answer: According to the chain of variable assignment in the text above, {hops + 1} variables are "
              f"assigned the value {value}, they are:")
    return Sample("vt", prompt, names)


def common_words(rng: random.Random, chars: int, common: int = 10) -> Sample:
    words = rng.sample(vocabulary(), len(vocabulary()))
    top, rest = words[:common], words[common:]
    entries = chars // 8  # about 8 characters a list entry
    listed = top * max(4, min(30, entries // (2 * common)))  # the common words fill at most half of a short list
    while len(listed) < entries:  # past the vocabulary, coded words
        listed += [rest.pop() if rest else "".join(rng.choices(string.ascii_lowercase, k=7))] * 3
    rng.shuffle(listed)
    numbered = " ".join(f"{i + 1}. {word}" for i, word in enumerate(listed))
    prompt = (f"Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
              f"ones that appear most often.\nHere is the list: {numbered}\nQuestion: What are the {common} most common "
              f"words in the above list? Answer: The top {common} words that appear most often in the list are:")
    return Sample("cwe", prompt, top)


def frequent_words(rng: random.Random, chars: int, alpha: float = 2.0, top: int = 3) -> Sample:
    coded = ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(max(top + 1, chars // 200))]
    weights = [1.0 / (rank + 1) ** alpha for rank in range(len(coded))]
    drawn = rng.choices(coded, weights=weights, k=max(50, chars // 7))  # about 7 characters a word
    counts = Counter(drawn)
    if len(counts) <= top:  # a short text drew too few distinct words to rank top + 1: add the missing ones
        drawn += [word for word in coded if word not in counts][: top + 1 - len(counts)]
        counts = Counter(drawn)
    while counts.most_common(top + 1)[-1][1] == counts.most_common(top)[-1][1]:  # a tie would make the answer ambiguous
        drawn.append(counts.most_common(top)[-1][0])  # one more of the last of the top: no longer tied
        counts = Counter(drawn)
    rng.shuffle(drawn)
    ranked = [word for word, _ in counts.most_common()]
    text = " ".join(drawn)
    prompt = (f"Read the following coded text and track the frequency of each coded word. Find the {top} most "
              f"frequently appeared coded words.\n{text}\nQuestion: Do not provide any explanation. Please ignore "
              f"the dots '....'. What are the {top} most frequently appeared words in the above coded text? "
              f"Answer: According to the coded text above, the {top} most frequently appeared words are:")
    return Sample("fwe", prompt, ranked[:top])


def make(task: str, seed: int, chars: int) -> Sample:
    """The sample `seed` of `task`, its haystack about `chars` characters long."""
    rng = random.Random(f"{task}:{seed}")
    if task.startswith("niah"):
        return niah(task, rng, chars)
    if task == "vt":
        return variable_tracking(rng, chars)
    if task == "cwe":
        return common_words(rng, chars)
    if task == "fwe":
        return frequent_words(rng, chars)
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
