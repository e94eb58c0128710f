"""A text too long to fit max_model_len whatever it holds is refused before tokenizing; one that might fit is
tokenized as before (bundled tokenizer)."""

from __future__ import annotations

import pytest

from longserve.server.bounded_tokenizer import BoundedTokenizer, longest_token_bytes
from longserve.server.errors import APIError


def test_no_token_holds_more_bytes_than_the_bound(tokenizer):
    longest = longest_token_bytes(tokenizer)
    texts = [tokenizer.decode([token_id]) for token_id in range(len(tokenizer))]
    assert longest == max(len(text.encode()) for text in texts)
    widest = max(texts, key=lambda text: len(text.encode()))
    run = widest * 50  # the densest text there is: each token as wide as a token gets
    assert len(tokenizer.encode(run, add_special_tokens=False)) >= len(run.encode()) / longest


def test_a_text_over_the_bound_is_refused_naming_the_field_and_one_under_it_tokenizes(tokenizer):
    bounded = BoundedTokenizer(tokenizer, max_model_len=100, param="prompt")
    limit = 100 * longest_token_bytes(tokenizer)
    with pytest.raises(APIError) as refused:
        bounded.encode("é" * (limit // 2 + 1))  # two bytes a character: over the bound in bytes, not in characters
    assert refused.value.status == 400 and refused.value.param == "prompt"
    assert "max_model_len of 100" in refused.value.message
    assert bounded.encode("hello world") == tokenizer.encode("hello world")
    assert bounded.chat_template == tokenizer.chat_template
