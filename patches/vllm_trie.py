"""Generation constrained to the keys of a token trie, as a vLLM V1 logits processor.

The same rule as the native engine (server/engine/native/constraint.py):
before each step only the tokens that continue some key from the current node
keep their logits; where a key may end, the end token (EOS) stands for the
end-of-key edge; a node from which only the end of the key follows allows
the end token alone, so vLLM stops there.

A request asks for it through SamplingParams.extra_args, with the trie
itself or with the path of its file (`trie_args` writes both forms):
    {"longserve_key_trie_npz": BYTES, "longserve_end_token": ID}
    {"longserve_key_trie": PATH, "longserve_end_token": ID}
A trie of up to INLINE_TRIE_BYTES travels inline, so it reaches workers on
any node. A larger one is a TokenTrie.save file, which every worker must see
at the same path: the engine writes it under --data-dir, the volume replicas
and Ray nodes share. Tries load once per path (or per content) and the 16
most recently used stay in memory.
"""

from __future__ import annotations

import io
from functools import lru_cache

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from longserve.patches.trie import TokenTrie

TRIE_ARG, TRIE_BYTES_ARG, END_TOKEN_ARG = "longserve_key_trie", "longserve_key_trie_npz", "longserve_end_token"
INLINE_TRIE_BYTES = 1 << 20  # each request carries an inline trie to every worker: beyond 1 MiB, a file is cheaper


def trie_bytes(trie: TokenTrie) -> bytes:
    buffer = io.BytesIO()
    trie.save(buffer)
    return buffer.getvalue()


def trie_args(trie: TokenTrie, end_token: int, inline: bytes | None, path: str | None) -> dict:
    """The request's extra_args: the trie inline (`inline`, from trie_bytes) when given, else its file's path."""
    return {TRIE_BYTES_ARG: inline, END_TOKEN_ARG: end_token} if inline is not None else {TRIE_ARG: path, END_TOKEN_ARG: end_token}


@lru_cache(maxsize=16)
def load_trie(path: str) -> TokenTrie:
    return TokenTrie.load(path)


@lru_cache(maxsize=16)
def trie_of_bytes(data: bytes) -> TokenTrie:
    return TokenTrie.load(io.BytesIO(data))


class KeyWalk:
    """One request's walk down the trie; called by vLLM with its output tokens so far and its logits row."""

    def __init__(self, trie: TokenTrie, end_token: int):
        self.trie, self.end_token = trie, end_token
        self.node: int | None = TokenTrie.ROOT
        self.seen = 0  # how many output tokens the walk has taken

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        while self.seen < len(output_ids) and self.node is not None:
            self.node = self.trie.step(self.node, output_ids[self.seen])
            self.seen += 1
        allowed = [self.end_token] if self.node is None else self.trie.allowed_tokens(self.node, self.end_token)
        allowed = torch.as_tensor(allowed, dtype=torch.long, device=logits.device)
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        return masked


class KeyLogitsProcessor(AdapterLogitsProcessor):
    @classmethod
    def validate_params(cls, params) -> None:
        args = params.extra_args or {}
        if (TRIE_ARG in args or TRIE_BYTES_ARG in args) and not isinstance(args.get(END_TOKEN_ARG), int):
            raise ValueError(f"{TRIE_ARG} needs an integer {END_TOKEN_ARG}")

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params) -> KeyWalk | None:
        args = params.extra_args or {}
        if TRIE_BYTES_ARG in args:
            return KeyWalk(trie_of_bytes(args[TRIE_BYTES_ARG]), args[END_TOKEN_ARG])
        if TRIE_ARG in args:
            return KeyWalk(load_trie(args[TRIE_ARG]), args[END_TOKEN_ARG])
        return None
