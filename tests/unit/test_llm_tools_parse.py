"""The llama.cpp engine's reading of tool calls out of a streamed reply (no model needed)."""

from __future__ import annotations

import json

import pytest

from pipelines.engines.base import ChatMessage, ToolCall, ToolSpec
from pipelines.engines.llm_llama import ToolCallParser, _call_grammar, _payload
from streaming.errors import EngineError


def parse(deltas: list[str]) -> tuple[list[str | ToolCall], ToolCallParser]:
    parser = ToolCallParser()
    out: list[str | ToolCall] = []
    for delta in deltas:
        out += parser.feed(delta)
    out += parser.finish()
    return out, parser


def words(out: list[str | ToolCall]) -> str:
    return "".join(d for d in out if isinstance(d, str))


def calls(out: list[str | ToolCall]) -> list[tuple[str, dict]]:
    return [(d.name, json.loads(d.arguments)) for d in out if isinstance(d, ToolCall)]


def test_plain_words_pass_through_as_they_stream() -> None:
    deltas = ["Three", " is", " <", " five", ", and", " a <", "b> tag", " is", " fine."]
    out, _ = parse(deltas)
    assert words(out) == "Three is < five, and a <b> tag is fine."
    assert len(out) >= 5  # streamed, not collected


def test_markup_split_across_deltas_is_never_spoken() -> None:
    deltas = ["Let me check", ".", "\n<", "tool_", "call>\n{\"na", 'me": "get_weather", "argu',
              'ments": {"city": "Par', 'is"}}\n</tool', "_call>"]
    out, parser = parse(deltas)
    assert out[0] == "Let me check" and words(out) == "Let me check."
    assert calls(out) == [("get_weather", {"city": "Paris"})]
    assert isinstance(out[-1], ToolCall) and parser.done


def test_words_are_not_held_longer_than_the_tag_start() -> None:
    parser = ToolCallParser()
    assert parser.feed("It is <t") == ["It is"]
    assert parser.feed("ool") == []
    assert parser.feed("s> time") == [" <tools> time"]


def test_the_bare_json_the_small_model_writes() -> None:
    # the packaged Qwen2.5 0.5B, token by token
    deltas = ['{"', "name", '":', ' "', "get", "_weather", '",', ' "', "arguments", '":', ' {"',
              "city", '":', ' "', "New", " York", '"}}']
    out, _ = parse(deltas)
    assert out == [out[0]] and calls(out) == [("get_weather", {"city": "New York"})]


def test_a_fenced_call() -> None:
    reply = '```json\n{\n  "name": "get_time",\n  "arguments": {}\n}\n```'
    out, _ = parse([reply[i:i + 3] for i in range(0, len(reply), 3)])
    assert calls(out) == [("get_time", {})] and not words(out)


def test_two_calls_each_get_an_id() -> None:
    reply = ('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>')
    out, _ = parse([reply[i:i + 5] for i in range(0, len(reply), 5)])
    assert calls(out) == [("get_time", {}), ("get_weather", {"city": "Zürich"})]
    first, second = out
    assert isinstance(first, ToolCall) and isinstance(second, ToolCall)
    assert first.call_id.startswith("call_") and first.call_id != second.call_id
    assert second.arguments == '{"city": "Zürich"}'  # re-serialised, not escaped


def test_arguments_written_as_json_text_are_read() -> None:
    out, _ = parse(['{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}'])
    assert calls(out) == [("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize("reply", [
    '<tool_call>\n{"name": "get_time", "arguments": {]}\n</tool_call>',  # malformed
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',  # cut short
    '<tool_call>\n{"name": "get_time", "arguments": [1, 2]}\n</tool_call>',  # not an object
    '<tool_call>\nget_time()\n</tool_call>',  # not JSON at all
    # a copy of the tool descriptions (the small model does this)
    '<tools>\n{"type": "function", "function": {"name": "get_time", "description": "Now."}}\n</tools>',
    '{"name": "get_time", "description": "Now.", "parameters": {}}',  # a description, not a call
])
def test_garbage_is_neither_spoken_nor_called(reply: str) -> None:
    out, parser = parse([reply[i:i + 4] for i in range(0, len(reply), 4)])
    assert out == [] and parser.done


def test_garbage_after_words_drops_only_the_garbage() -> None:
    out, _ = parse(["Sure.", " <tool_call>", '{"name": oops}', "</tool_call>"])
    assert out == ["Sure."]


def test_words_after_a_call_end_the_reply() -> None:
    parser = ToolCallParser()
    out = parser.feed('{"name": "get_time", "arguments": {}}')
    assert calls(out) == [("get_time", {})] and not parser.done
    assert parser.feed("\n```\n") == [] and not parser.done
    assert parser.feed("The time is") == [] and parser.done  # made up: generation stops
    assert parser.feed(" noon.") == [] and parser.finish() == []


def test_a_tag_cut_short_at_the_end_is_dropped() -> None:
    out, _ = parse(["Hello there.", "\n<tool"])
    assert out == ["Hello there."]


def test_history_with_calls_and_results_takes_the_templates_shape() -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    payload = _payload([ChatMessage("user", "Weather in Paris?"),
                        ChatMessage("assistant", "", tool_calls=(call,)),
                        ChatMessage("tool", "Sunny, 21 °C", tool_call_id="call_1")])
    assert payload[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert payload[2] == {"role": "tool", "content": "Sunny, 21 °C", "tool_call_id": "call_1"}


def test_a_required_call_needs_an_offered_tool() -> None:
    tools = [ToolSpec("get_time", "Now.")]
    assert "get_time" in _call_grammar(tools, "required")._grammar
    with pytest.raises(EngineError):
        _call_grammar(tools, "get_weather")


def test_parameters_the_grammar_cannot_hold_let_the_arguments_be_any_object() -> None:
    # a $ref to the schema's own $defs, as pydantic writes them (MCP servers)
    lookup = ToolSpec("lookup", "Look up a city.", {
        "type": "object", "$defs": {"City": {"type": "string"}},
        "properties": {"city": {"$ref": "#/$defs/City"}}})
    grammar = _call_grammar([lookup, ToolSpec("get_time", "Now.")], "required")._grammar
    assert '"\\"lookup\\""' in grammar and '"\\"get_time\\""' in grammar


def test_reading_until_a_call_begins() -> None:
    # the engine's first pass: a reply that begins with a call is generated again, held to the
    # tools' schemas, so nothing of it is passed on, and generation stops at once
    parser = ToolCallParser()
    deltas = (d for d in ['```', 'json\n{"', "name", '": "get_time"'])
    assert list(parser.read(deltas, until_call=True)) == []
    assert parser.call_first and deltas.gi_frame is None  # closed
    parser = ToolCallParser()
    out = list(parser.read((d for d in ["Sure.", " <tool_call>", '{"name": "get_time"}</tool_call>']),
                           until_call=True))
    assert not parser.call_first and out[0] == "Sure." and calls(out) == [("get_time", {})]


def test_with_no_tools_offered_calls_are_dropped_too() -> None:
    parser = ToolCallParser(calls=False)
    assert list(parser.read(d for d in ['{"name": "get_time", "arguments": {}}'])) == []
    parser = ToolCallParser(calls=False)
    assert list(parser.read(d for d in ["It is ", "14:37."])) == ["It is", " 14:37."]
