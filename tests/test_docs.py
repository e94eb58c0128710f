"""The documentation cannot rot: every relative link in README.md and docs/ resolves, and the README's examples
(curl and the openai SDK) run as written against a live server with the bundled model; only the port changes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)
README_URL = "http://127.0.0.1:8000"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):  # a web address, or a place on the page
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert broken == []
    assert len(PAGES) > 10  # the docs are there to check


def readme_examples() -> tuple[list[str], list[str], list[str]]:
    """The README's curl commands, its JSON replies as shown, and its Python examples."""
    blocks = FENCE.findall((REPO / "README.md").read_text(encoding="utf-8"))
    curls = [body for lang, body in blocks if lang == "sh" and body.startswith("curl ")]
    shown = [body for lang, body in blocks if lang == "json"]
    pythons = [body for lang, body in blocks if lang == "python"]
    return curls, shown, pythons


def test_the_readme_examples_run_as_written(bundled_server):
    curls, shown, pythons = readme_examples()
    assert curls and pythons and len(shown) == len(curls)
    for curl, reply_shown in zip(curls, shown):
        done = subprocess.run(["bash", "-c", curl.replace(README_URL, bundled_server)], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        shown_content = re.search(r'"content":"([^"]*)"', reply_shown).group(1)  # the README's reply, as printed
        assert reply["object"] == "chat.completion" and reply["model"] == "smollm2-135m-instruct"
        assert reply["choices"][0]["message"]["content"] == shown_content  # the model, greedy, says what the README says
    for example in pythons:
        assert README_URL in example
        done = subprocess.run([sys.executable, "-c", example.replace(README_URL, bundled_server)], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip(), example  # each prints what the model answered
