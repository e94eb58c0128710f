"""Generation constrained to the keys of a token trie, as a vLLM V1 logits processor.

The same rule as the native engine (server/engine/native/constraint.py):
before each step only the tokens that continue some key from the current node
keep their logits; where a key may end, the end token (EOS) stands for the
end-of-key edge; a node from which only the end of the key follows allows
the end token alone, so vLLM stops there.

A request asks for it through SamplingParams.extra_args:
    {"longserve_key_trie": PATH, "longserve_end_token": ID}
with PATH a TokenTrie saved by TokenTrie.save (the engine writes it; vLLM's
engine process runs on the same host). Tries are loaded once per path and
the 16 most recently used stay in memory (inline choices make a new path
per request; a registered base keeps its path while it lives).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from patches.trie import TokenTrie

TRIE_ARG, END_TOKEN_ARG = "longserve_key_trie", "longserve_end_token"


@lru_cache(maxsize=16)
def load_trie(path: str) -> TokenTrie:
    return TokenTrie.load(path)


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
        if TRIE_ARG in args and not isinstance(args.get(END_TOKEN_ARG), int):
            raise ValueError(f"{TRIE_ARG} needs an integer {END_TOKEN_ARG}")

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params) -> KeyWalk | None:
        args = params.extra_args or {}
        if TRIE_ARG not in args:
            return None
        return KeyWalk(load_trie(args[TRIE_ARG]), args[END_TOKEN_ARG])
