"""Prompt builders and the words the evaluations share: the passkey text, lengths, position labels."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from longserve.clients.server_client import Server

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
ANSWER_TOKENS = 10


def parse_length(text: str) -> int:
    """'4k' -> 4096, '1500' -> 1500."""
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def parse_lengths(text: str) -> list[int]:
    return [parse_length(part) for part in text.split(",") if part.strip()]


def length_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def position_label(position: dict | None) -> str:
    if position is None:
        return "server"
    parts = [position.get("type", "rope")]
    if "factor" in position:
        parts.append(f"x{position['factor']:g}")
    if position.get("type") == "ntk-mixed" and "b" in position:
        parts.append(f"b{position['b']:g}")
    if "window" in position:
        parts.append(f"w{position['window']}")
    if position.get("type") == "leaky-rerope" and "k" in position:
        parts.append(f"k{position['k']:g}")
    if position.get("type") == "self-extend" and "group" in position:
        parts.append(f"g{position['group']}")
    if "chunk_size" in position:
        parts.append(f"c{position['chunk_size']}")
    if "local_size" in position:
        parts.append(f"l{position['local_size']}")
    if position.get("logn"):
        parts.append("+logn")
    return " ".join(parts)


def passkey_prompt(server: Server, target_tokens: int, depth: float, key: str, sizes: dict) -> str:
    """A passkey prompt of about `target_tokens` tokens with the key at `depth` (0 = start, 1 = end)."""
    if not sizes:
        sizes["filler"] = len(server.tokenize(PASSKEY_FILLER * 64)) / 64
        sizes["fixed"] = len(server.tokenize(PASSKEY_INTRO + PASSKEY_SENTENCE.format(key="12345") + PASSKEY_QUESTION))
    fillers = max(1, int((target_tokens - sizes["fixed"]) / sizes["filler"]))
    before = round(fillers * depth)
    return (
        PASSKEY_INTRO
        + PASSKEY_FILLER * before
        + PASSKEY_SENTENCE.format(key=key)
        + PASSKEY_FILLER * (fillers - before)
        + PASSKEY_QUESTION
    )
