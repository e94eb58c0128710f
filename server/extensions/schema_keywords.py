"""The JSON-schema keywords the grammar engine would let pass unenforced, found before it compiles.

xgrammar (0.2.8, vLLM's default backend) compiles these keywords but does not
hold the output to them: an answer can break them and still end with
finish_reason "stop". Measured one by one on the matcher with an output that
breaks only that keyword (the list in the test names each). Until a backend
that enforces them is wired in (vLLM falls back to llguidance), a schema that
uses one is refused with a 400 that names it and where it is: a constraint is
a promise.

The walk follows the places where JSON Schema holds subschemas, never data
(`enum`, `const`, `default`, `examples`) nor property names, so a property
called "not" is not mistaken for the keyword.
"""

from __future__ import annotations

# keyword -> what to tell the client; each is accepted by the compiler and ignored by the matcher
UNENFORCED = {
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


def unenforced(schema, path: str = "") -> str | None:
    """The first keyword of `schema` the matcher would not enforce, as "PATH: what to do"; None when there is none."""
    if not isinstance(schema, dict):
        return None
    for keyword, advice in UNENFORCED.items():
        if keyword in schema and not (keyword == "uniqueItems" and schema[keyword] is False):
            return f"{path or '/'}: {advice}"
    if "pattern" in schema and ("minLength" in schema or "maxLength" in schema):
        return (f"{path or '/'}: pattern beside minLength or maxLength is not enforced (the pattern alone is): "
                "write the length into the pattern, e.g. ^[a-z]{2,5}$")
    if len(schema.get("allOf") or []) > 1:
        return f"{path or '/'}: allOf with more than one schema is not enforced: merge them into one schema"
    for name in SCHEMA_MAPS:
        subschemas = schema.get(name)
        if isinstance(subschemas, dict):
            for key, value in subschemas.items():
                if found := unenforced(value, f"{path}/{name}/{key}"):
                    return found
    for name in SCHEMA_VALUES:
        if isinstance(schema.get(name), dict) and (found := unenforced(schema[name], f"{path}/{name}")):
            return found
    for name in SCHEMA_LISTS:
        if isinstance(schema.get(name), list):
            for index, value in enumerate(schema[name]):
                if found := unenforced(value, f"{path}/{name}/{index}"):
                    return found
    return None
