"""`longserve eval` against a live server on loopback (tiny random-weight model)."""

from __future__ import annotations

import json

import pytest
import torch

from longserve.clients.eval_table import merge_results
from longserve.clients.longeval import run_loss
from longserve.clients.prompts import PASSKEY_INTRO, PASSKEY_QUESTION, parse_lengths, passkey_prompt
from longserve.clients.server_client import Server
from longserve.server.cli import main
from tests.conftest import make_engine, running_server, tiny_model

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. ") * 60


@pytest.fixture(scope="module")
def eval_server(tokenizer):
    model = tiny_model("llama", seed=11, max_position_embeddings=256)
    engine = make_engine(model, tokenizer, max_model_len=1024)
    with running_server(engine) as url:
        yield url, model


def test_parse_lengths():
    assert parse_lengths("2k,4k,1500") == [2048, 4096, 1500]


def test_passkey_prompts_have_the_asked_length_and_depth(eval_server):
    url, _ = eval_server
    server = Server.connect(url, None, None)
    sizes: dict = {}
    for target in (300, 900):
        for depth in (0.0, 0.5, 1.0):
            prompt = passkey_prompt(server, target, depth, "48213", sizes)
            assert abs(len(server.tokenize(prompt)) - target) <= sizes["filler"] + 2
            filler_start, filler_end = len(PASSKEY_INTRO), len(prompt) - len(PASSKEY_QUESTION)
            at = (prompt.index(" The pass key is 48213") - filler_start) / (filler_end - filler_start)
            assert abs(at - depth) < 0.1
    assert prompt.endswith("What is the pass key? The pass key is")


def test_loss_equals_a_direct_forward_and_errors_are_recorded(eval_server, tmp_path, tokenizer):
    url, model = eval_server
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    server = Server.connect(url, None, None)
    result = run_loss(server, text, [256, 512, 2048], 128, [None])
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)[:2048]
    for record, context in zip(result["records"][:2], (256, 512)):
        window = torch.tensor([tokens[2048 - context :]])
        with torch.no_grad():
            logprobs = model(window).logits[0, :-1].log_softmax(-1)
        targets = window[0, 1:]
        nll = -logprobs[torch.arange(len(targets)), targets]
        assert record["loss"] == pytest.approx(float(nll[-128:].mean()), abs=1e-3)
    assert result["records"][2]["loss"] is None and "max_model_len" in result["records"][2]["error"]


def test_eval_command_writes_table_json_and_png(eval_server, tmp_path, capsys):
    url, _ = eval_server
    main([
        "eval", "passkey", "--base-url", f"{url}/v1", "--lengths", "200,400", "--depths", "0.5", "--trials", "2",
        "--positions", '[{"type": "rope"}, {"type": "ntk-mixed", "factor": 2}]', "--out", str(tmp_path), "--name", "pk",
    ])
    result = json.loads((tmp_path / "pk.json").read_text())
    assert len(result["records"]) == 2 * 2 * 2
    assert {r["method"] for r in result["records"]} == {"rope", "ntk-mixed x2"}
    assert all(r["prompt_tokens"] <= r["length"] for r in result["records"])
    assert (tmp_path / "pk.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "ntk-mixed x2" in table and "/2" in table


def test_nbce_eval_runs_every_method_on_the_same_documents(eval_server, tmp_path, capsys):
    import random

    from longserve.clients.nbce_eval import documents

    docs, key, holder = documents(5, 120, 20.0, random.Random(1))
    assert [key in doc for doc in docs] == [i == holder for i in range(5)]

    url, _ = eval_server
    main(["eval", "nbce", "--base-url", url, "--docs", "2,3", "--trials", "2", "--doc-tokens", "60",
          "--truncate", "100", "--out", str(tmp_path), "--name", "nb"])
    result = json.loads((tmp_path / "nb.json").read_text())
    assert (tmp_path / "nb.png").stat().st_size > 0
    records = result["records"]
    assert len(records) == 2 * 2 * 4 and all(r["error"] is None for r in records)
    for n in (2, 3):
        for trial in range(2):
            mine = {r["method"]: r for r in records if r["n"] == n and r["trial"] == trial}
            assert len({r["key"] for r in mine.values()}) == 1  # one set of documents for every method
            assert mine["truncate"]["prompt_tokens"] == 100
            assert mine["concat"]["prompt_tokens"] == mine["concat-scaled"]["prompt_tokens"] > 100
            assert mine["nbce"]["prompt_tokens"] > mine["concat"]["prompt_tokens"]  # n + 1 rows, each with the question
    assert "nbce" in capsys.readouterr().out

    # --first-trial finishes a cut run: the trials it runs get the full run's documents
    main(["eval", "nbce", "--base-url", url, "--docs", "2,3", "--trials", "2", "--first-trial", "1", "--doc-tokens", "60",
          "--truncate", "100", "--methods", "truncate", "--out", str(tmp_path), "--name", "rest"])
    rest = json.loads((tmp_path / "rest.json").read_text())["records"]
    assert [(r["n"], r["trial"]) for r in rest] == [(2, 1), (3, 1)]
    assert [r["key"] for r in rest] == [r["key"] for r in records if r["trial"] == 1 and r["method"] == "truncate"]

    # eval table: the pieces print as one table, the re-run trial in place of the first run's records
    capsys.readouterr()
    main(["eval", "table", str(tmp_path / "nb.json"), str(tmp_path / "rest.json"), "--plot", str(tmp_path / "both.png")])
    merged = merge_results([result, json.loads((tmp_path / "rest.json").read_text())])
    assert len(merged["records"]) == len(records)
    assert [r for r in merged["records"] if r["method"] == "truncate" and r["trial"] == 1] == rest
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[1:]] == ["2", "3"] and "concat-scaled" in table[0]
    assert (tmp_path / "both.png").stat().st_size > 0


def test_eval_table_merges_every_axis_of_a_passkey_grid():
    def piece(length, depth):
        record = {"method": "plain", "length": length, "depth": depth, "trial": 0, "found": True}
        return {"kind": "passkey", "model": "m", "lengths": [length], "depths": [depth], "records": [record]}

    merged = merge_results([piece(200, 0.5), piece(400, 0.1)])
    assert merged["lengths"] == [200, 400] and merged["depths"] == [0.1, 0.5] and len(merged["records"]) == 2


def test_eval_table_refuses_files_it_cannot_merge(tmp_path):
    def written(name, result):
        (tmp_path / name).write_text(json.dumps(result))
        return str(tmp_path / name)

    passkey = written("p.json", {"kind": "passkey", "model": "m", "lengths": [200], "records": [], "interrupted": False})
    nbce = written("n.json", {"kind": "nbce", "model": "m", "docs": [2], "records": [], "interrupted": False})
    other = written("o.json", {"kind": "nbce", "model": "other", "docs": [2], "records": [], "interrupted": False})
    stray = written("s.json", {"hello": 1})
    for files, message in [([passkey, nbce], "the files hold nbce and passkey results; give files of one kind"),
                           ([nbce, other], "different models .* give files of one model"),
                           ([stray], "not a longserve eval result"),
                           ([str(tmp_path / "missing.json")], "cannot read .*missing.json")]:
        with pytest.raises(SystemExit, match=message):
            main(["eval", "table", *files])


@pytest.mark.parametrize("flags, message", [
    (["--methods", "nbce,concatenate"], "unknown method 'concatenate'; choose from"),
    (["--trials", "2", "--first-trial", "2"], "--first-trial 2 is out of range; trials are numbered 0 to 1"),
])
def test_nbce_eval_rejects_bad_flags_before_connecting(flags, message):
    with pytest.raises(SystemExit, match=message):
        main(["eval", "nbce", "--base-url", "http://127.0.0.1:9/v1", *flags])  # nothing listens on port 9


@pytest.mark.parametrize("kind, args, planned", [
    ("passkey", ["--lengths", "200,300", "--depths", "0.5", "--trials", "2"], 4),
    ("nbce", ["--docs", "2,3", "--trials", "1", "--doc-tokens", "60", "--truncate", "100"], 8),
])
def test_ctrl_c_keeps_what_finished(eval_server, tmp_path, capsys, monkeypatch, kind, args, planned):
    """Ctrl-C (KeyboardInterrupt in the main thread) during the third prompt: the
    two finished prompts are written, cells not run show '-', and the exit status is 130."""
    calls = []
    complete = Server.complete

    def interrupted_on_the_third(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return complete(self, *a, **kw)

    monkeypatch.setattr(Server, "complete", interrupted_on_the_third)
    url, _ = eval_server
    with pytest.raises(SystemExit) as stopped:
        main(["eval", kind, "--base-url", url, *args, "--out", str(tmp_path), "--name", "cut"])
    assert stopped.value.code == 130
    result = json.loads((tmp_path / "cut.json").read_text())
    assert result["interrupted"] is True and len(result["records"]) == 2 < planned
    assert all(r["error"] is None for r in result["records"])
    assert (tmp_path / "cut.png").stat().st_size > 0
    table = capsys.readouterr().out.splitlines()
    assert table[-1].split()[-1] == "-"  # the last cell was never asked


def test_position_labels_tell_every_setting_apart():
    from longserve.clients.prompts import position_label

    labels = {position_label(p) for p in ({"type": "rerope", "window": 1024}, {"type": "rerope", "window": 2048, "logn": True},
                                          {"type": "leaky-rerope", "window": 2048, "k": 16}, {"type": "ntk-mixed", "factor": 2, "b": 0.625},
                                          {"type": "dca", "logn": True}, {"type": "dca", "chunk_size": 8192, "local_size": 512, "logn": True})}
    assert labels == {"rerope w1024", "rerope w2048 +logn", "leaky-rerope w2048 k16", "ntk-mixed x2 b0.625", "dca +logn",
                      "dca c8192 l512 +logn"}
