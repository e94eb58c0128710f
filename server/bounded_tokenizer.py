"""A tokenizer that refuses, before tokenizing, a text too long to fit the model whatever it holds.

Tokenizing is the one cost of a request paid before any limit in tokens can be checked: 15 MB of prompt took a
worker thread more than a minute under load, for a 400 at the end. No token holds more than the longest
token's bytes (81 for the bundled model), so a text of more bytes than max_model_len times that can never fit;
it gets its 400 at once.
"""

from __future__ import annotations

import functools

from longserve.server.errors import APIError

@functools.cache
def longest_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes any one token decodes to, computed once per tokenizer (about 0.3 s for 49k tokens)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max(len(tokenizer.convert_tokens_to_string([token]).encode()) for token in tokens if token)


class BoundedTokenizer:
    """`tokenizer`, whose encode() refuses a text of more bytes than `max_model_len` tokens could hold (a 400 on
    `param`); everything else passes through."""

    def __init__(self, tokenizer, max_model_len: int, param: str):
        self.tokenizer, self.max_model_len, self.param = tokenizer, max_model_len, param

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode(self, text: str, **kwargs) -> list[int]:
        per_token = longest_token_bytes(self.tokenizer)
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_model_len * per_token:
            raise APIError(400, f"a text of {size:,} bytes cannot fit this server's max_model_len of {self.max_model_len} "
                                f"tokens (one token holds at most {per_token} bytes); shorten it", self.param)
        return self.tokenizer.encode(text, **kwargs)
