"""Schema keywords xgrammar would let pass: each is shown unenforced on xgrammar's own matcher (so the day a new
xgrammar enforces one, this test says so), then either shown enforced by llguidance's matcher, where the native
engine sends it, or refused by name where llguidance drops it too; the keywords xgrammar does enforce, and
property names that look like keywords, pass."""

from __future__ import annotations

import json

import pytest

from longserve.server.extensions.guidance import compile_guidance
from longserve.server.extensions.schema_keywords import needs_guidance, unenforced, xgrammar_misses

VOCAB = 49152

# keyword: (a schema using it, an answer that breaks only that keyword)
IGNORED = {
    "uniqueItems": ({"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": True}, ["b", "b"]),
    "not": ({"type": "string", "not": {"const": "x"}}, "x"),
    "if/then": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                 "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, {"a": 1}),
    "contains": ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, [1]),
    "dependentRequired": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, {"a": 1}),
    "dependentSchemas": ({"type": "object", "properties": {"a": {}, "b": {}}, "dependentSchemas": {"a": {"required": ["b"]}}},
                         {"a": 1}),
    "pattern + maxLength": ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 2}, "abcde"),
    "pattern + minLength": ({"type": "string", "pattern": "^[a-z]+$", "minLength": 4}, "ab"),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]}, {"a": 1}),
}
ENFORCED = {
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 3),
    "maxProperties": ({"type": "object", "maxProperties": 1}, {"a": 1, "b": 2}),
    "exclusiveMinimum": ({"type": "integer", "exclusiveMinimum": 5}, 5),
    "propertyNames": ({"type": "object", "propertyNames": {"pattern": "^a"}}, {"b": 1}),
    "patternProperties": ({"type": "object", "patternProperties": {"^a": {"type": "integer"}}, "additionalProperties": False},
                          {"a": "x"}),
    "maxLength": ({"type": "string", "maxLength": 2}, "abc"),
    "format": ({"type": "string", "format": "date"}, "nope"),
    "unevaluatedProperties": ({"type": "object", "properties": {"a": {"type": "integer"}}, "unevaluatedProperties": False},
                              {"a": 1, "b": 2}),
}


@pytest.fixture(scope="module")
def matcher_accepts(tokenizer):
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=49152)
    compiler = xgrammar.GrammarCompiler(info)

    def accepts(schema, answer) -> bool:
        """Whether xgrammar lets `answer` through, written as the server's compact JSON, and then end."""
        matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
        return matcher.accept_string(json.dumps(answer)) and matcher.accept_token(info.stop_token_ids[0])

    return accepts


@pytest.fixture(scope="module")
def guidance_accepts(tokenizer):
    def accepts(schema, answer) -> bool:
        """Whether llguidance lets `answer` through and then the end, token by token as the engine feeds it."""
        matcher = compile_guidance(tokenizer, VOCAB, schema).matcher()
        return all(matcher.consume_token(token) for token in tokenizer.encode(json.dumps(answer, separators=(",", ":")))) \
            and matcher.consume_token(tokenizer.eos_token_id) and not matcher.is_error()

    return accepts


def nested(schema) -> dict:
    return {"type": "object", "properties": {"v": {"type": "array", "items": schema}}, "$defs": {"x": {"type": "string"}}}


@pytest.mark.parametrize("name", sorted(IGNORED))
def test_a_keyword_xgrammar_ignores_goes_to_llguidance_or_is_refused_by_name(matcher_accepts, guidance_accepts, tokenizer, name):
    schema, breaking = IGNORED[name]
    assert matcher_accepts(schema, breaking), f"xgrammar now enforces {name}"
    keyword = name.split()[0].split("/")[0]
    if xgrammar_misses(schema):  # llguidance holds it: the native engine sends it there
        assert unenforced(schema) is None and keyword in needs_guidance(schema)
        assert not guidance_accepts(schema, breaking)
        assert needs_guidance(nested(schema)).startswith("/properties/v/items: ")
        return
    found = unenforced(schema)
    assert found and keyword in found, found
    assert unenforced(nested(schema)).startswith("/properties/v/items: ")
    with pytest.raises(ValueError, match="Unimplemented"):  # llguidance would drop it too: refusing is right
        compile_guidance(tokenizer, VOCAB, schema)


def test_llguidance_holds_a_pattern_with_its_length_and_all_of_an_allof(guidance_accepts):
    schema = {"type": "string", "pattern": "^[a-z]+$", "minLength": 2, "maxLength": 4}
    assert guidance_accepts(schema, "abc") and guidance_accepts(schema, "abcd")
    assert not guidance_accepts(schema, "a") and not guidance_accepts(schema, "abcde") and not guidance_accepts(schema, "ab1")
    both, _ = IGNORED["allOf"]
    assert guidance_accepts(both, {"a": 1, "b": 2}) and not guidance_accepts(both, {"b": 2})


def test_a_schema_no_answer_can_meet_is_refused_by_llguidance(tokenizer):
    for schema in ({"type": "string", "pattern": "^[a-z]{5}$", "maxLength": 2}, {"allOf": [{"type": "string"}, {"type": "integer"}]}):
        with pytest.raises(ValueError, match="Unsatisfiable"):
            compile_guidance(tokenizer, VOCAB, schema)


@pytest.mark.parametrize("name", sorted(ENFORCED))
def test_a_keyword_xgrammar_enforces_passes(matcher_accepts, name):
    schema, breaking = ENFORCED[name]
    assert not matcher_accepts(schema, breaking)
    assert unenforced(schema) is None and xgrammar_misses(schema) is None


def test_data_and_property_names_are_not_read_as_keywords():
    schema = {"type": "object", "properties": {"not": {"type": "string"}, "if": {"enum": [{"not": 1}]}},
              "default": {"uniqueItems": True}, "uniqueItems": False}
    assert unenforced(schema) is None
