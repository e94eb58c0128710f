"""Generation constrained to the keys of a token trie (patches/trie.py), per sequence.

Before each sampling step a constrained row keeps only the tokens that
continue some key from its current node; where a key may end, the model's
end token (EOS) stands for the end-of-key edge. After the step the row walks
on. A key is complete when the end token is taken, or when the walk reaches a
node from which nothing but the end of the key follows: the sequence then
stops with that key's entry. A sequence cut by max_tokens has no entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patches.trie import END, TokenTrie
from server.engine.base import KeyConstraint


@dataclass
class KeyState:
    constraint: KeyConstraint
    node: int = TokenTrie.ROOT
    entry: int | None = None  # set once a key is complete

    def allowed_tokens(self) -> torch.Tensor:
        return torch.from_numpy(self.constraint.trie.allowed_tokens(self.node, self.constraint.end_token)).long()

    def advance(self, token: int) -> bool:
        """Take `token`; True when the key is complete."""
        trie = self.constraint.trie
        if token == self.constraint.end_token and trie.entry_at(self.node) is not None:
            self.entry = trie.entry_at(self.node)
            return True
        node = trie.step(self.node, token)
        if node is None:  # the mask makes this unreachable; failing loudly beats a wrong answer
            raise RuntimeError(f"token {token} does not continue any key from trie node {self.node}")
        self.node = node
        allowed = trie.allowed(node)
        if len(allowed) == 1 and allowed[0] == END:
            self.entry = trie.entry_at(node)
            return True
        return False


def mask_to_keys(logits: torch.Tensor, states: list[KeyState | None]) -> torch.Tensor:
    """-inf on every token a row's key state does not allow; rows without a state are left alone."""
    masks = torch.zeros_like(logits)
    for row, state in enumerate(states):
        if state is not None:
            masks[row] = float("-inf")
            masks[row, state.allowed_tokens().to(logits.device)] = 0.0
    return logits + masks
