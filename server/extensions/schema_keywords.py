"""Which grammar engine can hold an answer to a JSON schema, found before anything compiles.

xgrammar (0.2.8, vLLM's default backend) compiles every keyword below but
does not hold the output to it: an answer can break it and still end with
finish_reason "stop" (measured one by one on its matcher; the test names
each). llguidance, the other engine vLLM ships, enforces some of them, as
vLLM's "auto" backend relies on. So a schema goes:
- to xgrammar when it has none of them;
- to llguidance when it needs one only llguidance enforces (`xgrammar_ignored`), or carries a `pattern`
  (xgrammar's JSON-string matcher can take seconds per token on a nested repetition such as
  "(.*){1,32000}", measured; llguidance runs a pattern as a lexer with a bounded state count);
- nowhere, with a 400 naming the keyword and where it is, when neither
  enforces it (`NEITHER_ENFORCES`): a constraint is a promise.

The walk follows the places where JSON Schema holds subschemas, never data
(`enum`, `const`, `default`, `examples`) nor property names, so a property
called "not" is not mistaken for the keyword.
"""

from __future__ import annotations

from typing import Callable

# keyword -> what to tell the client; accepted by both compilers, enforced by neither (llguidance warns "Unimplemented")
NEITHER_ENFORCES = {
    "uniqueItems": "uniqueItems is not enforced: remove it, or use an enum per position",
    "not": "not is not enforced: write the allowed values instead (enum, pattern)",
    "if": "if/then/else is not enforced: write the cases as anyOf branches",
    "then": "if/then/else is not enforced: write the cases as anyOf branches",
    "else": "if/then/else is not enforced: write the cases as anyOf branches",
    "contains": "contains is not enforced: use prefixItems to place the item",
    "minContains": "minContains is not enforced: use prefixItems to place the items",
    "maxContains": "maxContains is not enforced: use items with an enum instead",
    "dependentRequired": "dependentRequired is not enforced: write the cases as anyOf branches",
    "dependentSchemas": "dependentSchemas is not enforced: write the cases as anyOf branches",
}
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_VALUES = ("items", "additionalProperties", "additionalItems", "propertyNames", "contains", "not", "if", "then",
                 "else", "unevaluatedProperties", "unevaluatedItems")
SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf", "items")


def refused_keyword(schema: dict) -> str | None:
    for keyword, advice in NEITHER_ENFORCES.items():
        if keyword in schema and not (keyword == "uniqueItems" and schema[keyword] is False):
            return advice
    return None


def xgrammar_ignored(schema: dict) -> str | None:
    """What in this one schema (not its subschemas) xgrammar would let pass and llguidance enforces."""
    if "pattern" in schema and ("minLength" in schema or "maxLength" in schema):
        return "pattern beside minLength or maxLength"
    if len(schema.get("allOf") or []) > 1:
        return "allOf with more than one schema"
    return None


def pattern(schema: dict) -> str | None:
    return "pattern" if isinstance(schema.get("pattern"), str) else None


def first(schema, found: Callable[[dict], str | None], path: str = "") -> str | None:
    """`found` of the first (sub)schema of `schema` where it says something, as "PATH: what it said"; else None."""
    if not isinstance(schema, dict):
        return None
    if said := found(schema):
        return f"{path or '/'}: {said}"
    for name in SCHEMA_MAPS:
        subschemas = schema.get(name)
        if isinstance(subschemas, dict):
            for key, value in subschemas.items():
                if said := first(value, found, f"{path}/{name}/{key}"):
                    return said
    for name in SCHEMA_VALUES:
        if isinstance(schema.get(name), dict) and (said := first(schema[name], found, f"{path}/{name}")):
            return said
    for name in SCHEMA_LISTS:
        if isinstance(schema.get(name), list):
            for index, value in enumerate(schema[name]):
                if said := first(value, found, f"{path}/{name}/{index}"):
                    return said
    return None


def unenforced(schema) -> str | None:
    """The first keyword of `schema` neither grammar engine would enforce, as "PATH: what to do"; None when none."""
    return first(schema, refused_keyword)


def xgrammar_misses(schema) -> str | None:
    """The first keyword of `schema` that only llguidance enforces, as "PATH: keyword"; None when xgrammar holds it."""
    return first(schema, xgrammar_ignored)


def needs_guidance(schema) -> str | None:
    """Why the native engine sends `schema` to llguidance rather than xgrammar ("PATH: keyword"); None if it does not."""
    return xgrammar_misses(schema) or first(schema, pattern)
