"""Every string a client sends must be valid Unicode before it reaches a tokenizer.

JSON can spell a lone UTF-16 surrogate ("\\ud800"), and Python's json module
also turns the raw bytes ED A0 80 into one. Such a string cannot be encoded
as UTF-8, so tokenizers, logs and responses fail on it deep inside the
server. One walk over the decoded body, before any field is read, finds the
first one and names where it is.
"""

from __future__ import annotations

import re

from pydantic_core import PydanticCustomError

SURROGATE = re.compile("[\ud800-\udfff]")
TEXT_OR_CONTAINER = (str, dict, list)


def first_invalid_text(value) -> tuple[str, int] | None:
    """(dotted path, character index) of the first string in a JSON value holding a surrogate, or None.

    Iterative, not recursive: a deeply nested body must not exhaust the stack."""
    stack = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            found = SURROGATE.search(item)
            if found:
                return ".".join(map(str, path)) or "body", found.start()
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                if isinstance(key, str) and SURROGATE.search(key):
                    return ".".join(map(str, (*path, "<key>"))), SURROGATE.search(key).start()
                if isinstance(child, TEXT_OR_CONTAINER):
                    stack.append(((*path, key), child))
        elif isinstance(item, list):  # token-id lists hold only numbers: no path is built for them
            children = [(index, child) for index, child in enumerate(item) if type(child) in TEXT_OR_CONTAINER]
            stack.extend(((*path, index), child) for index, child in reversed(children))
    return None


INVALID_TEXT = "{path} is not valid Unicode: a lone surrogate at character {at}; send UTF-8 text"


def check_text(data):
    """A pydantic before-validator: the body unchanged, or an 'invalid_unicode' error naming the field."""
    found = first_invalid_text(data)
    if found is not None:
        path, at = found
        raise PydanticCustomError("invalid_unicode", INVALID_TEXT, {"path": path, "at": at})
    return data
