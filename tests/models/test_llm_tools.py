"""Tool calling with the packaged Qwen2.5 0.5B through llama.cpp (bench/llm_tools.py measures
how reliable it is; these questions are ones it gets right at temperature 0)."""

from __future__ import annotations

import json

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from pipelines import models
from pipelines.compute import Compute
from pipelines.engines.base import ChatMessage, Sampling, ToolCall, ToolSpec
from pipelines.engines.llm_llama import LlamaLlm, _payload, _tools
from pipelines.prompt import DEFAULT_SYSTEM_PROMPT

pytestmark = pytest.mark.models

SYSTEM = DEFAULT_SYSTEM_PROMPT
TOOLS = [
    ToolSpec("get_time", "Get the current local time."),
    ToolSpec("get_weather", "Get the current weather in a city.",
             {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
              "required": ["city"]}),
]
GREEDY = Sampling(temperature=0.0)


@pytest.fixture(scope="module")
def qwen(compute: Compute) -> LlamaLlm:
    llm = LlamaLlm(models.llm_model("qwen2.5-0.5b", models.default_cache_dir()), compute, threads=2)
    llm.warm_up(SYSTEM, tools=TOOLS)
    return llm


async def reply(llm: LlamaLlm, messages: list[ChatMessage],
                sampling: Sampling = GREEDY) -> tuple[str, list[ToolCall]]:
    words: list[str] = []
    calls: list[ToolCall] = []
    async for part in llm.stream(messages, max_tokens=80, tools=TOOLS, sampling=sampling):
        if isinstance(part, ToolCall):
            calls.append(part)
        else:
            words.append(part)
    return "".join(words), calls


async def test_a_question_about_the_time_calls_get_time_and_its_result_is_spoken(qwen: LlamaLlm) -> None:
    history = [ChatMessage("system", SYSTEM), ChatMessage("user", "What time is it?")]
    words, calls = await reply(qwen, history)
    assert words == "" and [c.name for c in calls] == ["get_time"]
    assert json.loads(calls[0].arguments) == {}
    history += [ChatMessage("assistant", "", tool_calls=(calls[0],)),
                ChatMessage("tool", "14:37", tool_call_id=calls[0].call_id)]
    # with tools still offered the small model calls again; the answer is asked for without
    words, again = await reply(qwen, history, Sampling(temperature=0.0, tool_choice="none"))
    assert again == [] and "14:37" in words and "{" not in words, words


async def test_a_weather_question_calls_with_the_city(qwen: LlamaLlm) -> None:
    words, calls = await reply(qwen, [ChatMessage("system", SYSTEM),
                                      ChatMessage("user", "How's the weather in Tokyo?")])
    assert words == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Tokyo"})]


async def test_tool_choice(qwen: LlamaLlm) -> None:
    history = [ChatMessage("system", SYSTEM), ChatMessage("user", "Who wrote Hamlet?")]
    words, calls = await reply(qwen, history, Sampling(temperature=0.0, tool_choice="none"))
    assert "Shakespeare" in words and calls == []
    words, calls = await reply(qwen, history, Sampling(temperature=0.0, tool_choice="get_weather"))
    assert words == "" and [c.name for c in calls] == ["get_weather"]
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    words, calls = await reply(qwen, history, Sampling(temperature=0.0, tool_choice="required"))
    assert words == "" and len(calls) == 1 and calls[0].name in ("get_time", "get_weather")


def test_the_history_renders_in_the_templates_tool_format(qwen: LlamaLlm) -> None:
    """Through the GGUF's own chat template, as llama-cpp-python renders it."""
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    history = [ChatMessage("system", SYSTEM), ChatMessage("user", "Weather in Paris?"),
               ChatMessage("assistant", "", tool_calls=(call,)),
               ChatMessage("tool", "Sunny, 21 °C", tool_call_id="call_1")]
    template = qwen._llama.metadata["tokenizer.chat_template"]
    prompt = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="")(
        messages=_payload(history), tools=_tools(TOOLS)).prompt
    assert prompt.startswith(f"<|im_start|>system\n{SYSTEM}\n\n# Tools\n")
    assert '"name": "get_time", "description": "Get the current local time."' in prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call><|im_end|>\n') in prompt
    assert prompt.endswith("<|im_start|>user\n<tool_response>\nSunny, 21 °C\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n")
