"""`longserve eval ruler`: every task hides what it asks for, scores as RULER does, and runs end to end against a
live server on loopback (tiny random-weight model: the scores themselves are not judged)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from longserve.clients.ruler import effective_length, ruler_table
from longserve.clients.ruler_tasks import ANSWER_TOKENS, NEEDLE, TASKS, make, score
from longserve.server.cli import main
from tests.conftest import make_engine, running_server, tiny_model


@pytest.mark.parametrize("task", TASKS)
def test_every_task_hides_its_references_and_is_seeded(task):
    sample = make(task, 7, 4000)
    assert sample.references and all(reference in sample.prompt for reference in sample.references)
    assert make(task, 7, 4000) == sample and make(task, 8, 4000) != sample
    assert len(make(task, 7, 16000).prompt) > 3 * len(sample.prompt)  # the haystack grows with the length asked
    assert score(" ".join(sample.references), sample.references) == 100.0


def test_needles_values_chains_and_word_counts_are_what_the_question_asks():
    multivalue = make("niah_multivalue", 1, 3000)
    key = re.search(r"numbers for (\S+) mentioned", multivalue.prompt).group(1)
    assert [NEEDLE.format(key=key, value=v) in multivalue.prompt for v in multivalue.references] == [True] * 4
    multikey = make("niah_multikey", 1, 3000)
    assert multikey.prompt.count("One of the special magic numbers for") == 4 and len(multikey.references) == 1

    chain = make("vt", 2, 3000)
    value = re.search(r"VAR \w+ = (\d+)", chain.prompt).group(1)
    names = chain.references
    assert f"VAR {names[0]} = {value}" in chain.prompt
    for before, after in zip(names, names[1:]):  # each assignment comes after the one it reads
        assert chain.prompt.index(f"VAR {before} =") < chain.prompt.index(f"VAR {after} = VAR {before}")

    common = make("cwe", 3, 6000)
    listed = Counter(re.findall(r"\d+\. ([a-z]+)", common.prompt))
    assert sorted(word for word, _ in listed.most_common(10)) == sorted(common.references)
    assert {listed[w] for w in common.references} == {30} and max(c for w, c in listed.items() if w not in common.references) == 3

    frequent = make("fwe", 4, 6000)
    coded = re.search(r"coded words\.\n(.*)\nQuestion", frequent.prompt, re.DOTALL).group(1).split()
    counts = Counter(coded).most_common()
    assert [word for word, _ in counts[:3]] == frequent.references and counts[2][1] > counts[3][1]


def test_score_and_effective_length():
    assert score("the numbers are 1234567 and 7654321", ["1234567", "7654321", "1111111"]) == pytest.approx(200 / 3)
    assert score("QUIET-HARBOUR", ["quiet-harbour"]) == 100.0
    by_length = {4096: {"average": 95.0}, 8192: {"average": 86.0}, 16384: {"average": 60.0}, 32768: {"average": 90.0}}
    assert effective_length(by_length, [4096, 8192, 16384, 32768]) == 8192  # a later recovery does not count
    assert effective_length({4096: {"average": 80.0}}, [4096]) is None


@pytest.mark.parametrize("task", ["vt", "fwe"])
def test_a_length_too_short_for_the_task_still_makes_a_sample(task):
    for seed in range(40):  # fwe once drew fewer than top + 1 distinct words at this size and never left its tie loop
        sample = make(task, seed, 10)
        assert sample.references and all(reference in sample.prompt for reference in sample.references)


def test_the_table_keeps_long_method_names_apart_from_the_task():
    method = "ntk-mixed x2 b0.625 +logn w4096 leaky"  # longer than the column's default width
    records = [{"method": method, "length": 4096, "task": task, "score": 50.0} for task in ("vt", "cwe")]
    table = ruler_table({"records": records, "lengths": [4096], "tasks": ["vt", "cwe"], "threshold": 85.6})
    rows = [line.split() for line in table.splitlines()[1:]]
    assert [row[len(method.split())] for row in rows] == ["vt", "cwe", "average", "effective"]
    assert [row[-1] for row in rows[:3]] == ["50.0", "50.0", "50.0"]
    assert "none   (the shortest length's average is under 85.6)" in table.splitlines()[-1]  # not "every average >= 85.6"
    passing = [{**record, "score": 90.0} for record in records]
    table = ruler_table({"records": passing, "lengths": [4096], "tasks": ["vt", "cwe"], "threshold": 85.6})
    assert table.splitlines()[-1].endswith("4k   (every average up to it >= 85.6)")


@pytest.mark.server
def test_the_command_fits_every_prompt_to_its_length_and_writes_table_json_and_png(tokenizer, tmp_path, capsys):
    engine = make_engine(tiny_model("llama", seed=21, max_position_embeddings=256), tokenizer, max_model_len=2048)
    with running_server(engine) as url:
        main(["eval", "ruler", "--base-url", url, "--lengths", "1k,2k", "--samples", "1", "--out", str(tmp_path),
              "--name", "ruler", "--positions", '[{"type": "rope"}, {"type": "self-extend", "window": 64, "group": 8}]'])
    result = json.loads((tmp_path / "ruler.json").read_text())
    assert len(result["records"]) == 2 * 2 * len(TASKS) and not result["interrupted"]
    for record in result["records"]:
        assert record["error"] is None, record["error"]
        budget = ANSWER_TOKENS[record["task"]] + 8  # the room kept for the answer
        assert 0.95 * (record["length"] - budget) <= record["prompt_tokens"] <= record["length"] - budget
    assert {r["method"] for r in result["records"]} == {"rope", "self-extend w64 g8"}
    assert (tmp_path / "ruler.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "effective length" in table and "niah_multiquery" in table and "average" in table
