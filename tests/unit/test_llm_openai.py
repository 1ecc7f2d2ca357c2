"""The OpenAI-compatible LLM backend against a real local HTTP server that checks the request."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from pipelines.engines.base import ChatMessage, Sampling, ToolCall, ToolSpec
from pipelines.engines.llm_openai import OpenAiLlm
from streaming.errors import EngineError
from tests.conftest import free_port

# A little text, then two calls in fragments as OpenAI streams them: the id and name first, the
# arguments in pieces; the second call comes without an id.
FRAGMENTED_CALLS: list[dict] = [
    {"role": "assistant", "content": "Let me check."},
    {"tool_calls": [{"index": 0, "id": "call_abc", "type": "function",
                     "function": {"name": "get_weather", "arguments": ""}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Par'}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]},
    {"tool_calls": [{"index": 1, "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
]
# As some servers send them: each call whole, both numbered 0 (and no arguments for the second).
WHOLE_CALLS: list[dict] = [
    {"role": "assistant", "content": "Let me check."},
    {"tool_calls": [{"index": 0, "id": "call_abc", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"tool_calls": [{"index": 0, "id": "call_def", "type": "function", "function": {"name": "get_time"}}]},
]


class FakeEndpoint:
    """Speaks the streaming chat-completions wire format (server-sent events)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.mode = "ok"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.mode == "error":
            return web.json_response({"error": {"message": "model overloaded"}}, status=503)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.mode.startswith("tool"):
            await self.stream_tool_calls(resp, whole=self.mode == "tool-whole")
            return resp
        pieces = ["The capital", " of France", " is Paris."]
        if self.mode == "garbage":
            await resp.write(b"data: {not json}\n\n")
        for i, text in enumerate(pieces):
            chunk = {"id": "c1", "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": ({"role": "assistant"} if i == 0 else {})
                                  | {"content": text}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def stream_tool_calls(self, resp: web.StreamResponse, *, whole: bool) -> None:
        for delta in WHOLE_CALLS if whole else FRAGMENTED_CALLS:
            chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}\n\n')
        await resp.write(b"data: [DONE]\n\n")


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[FakeEndpoint, str]]:
    fake = FakeEndpoint()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield fake, f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


MESSAGES = [ChatMessage("system", "Be brief."), ChatMessage("user", "Capital of France?")]


async def test_streams_deltas_and_sends_a_proper_request(endpoint) -> None:  # type: ignore[no-untyped-def]
    fake, url = endpoint
    llm = OpenAiLlm(url, "qwen2-7b", api_key="secret", temperature=0.1)
    deltas = [d async for d in llm.stream(MESSAGES, max_tokens=50)]
    await llm.aclose()
    assert "".join(deltas) == "The capital of France is Paris."
    assert len(deltas) == 3
    req = fake.requests[0]
    assert req["model"] == "qwen2-7b" and req["stream"] is True and req["max_tokens"] == 50
    assert req["messages"] == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Capital of France?"}]
    assert fake.headers[0]["Authorization"] == "Bearer secret"


@pytest.mark.parametrize("mode", ["error", "garbage"])
async def test_endpoint_failures_become_engine_errors(endpoint, mode: str) -> None:  # type: ignore[no-untyped-def]
    fake, url = endpoint
    fake.mode = mode
    llm = OpenAiLlm(url, "m")
    with pytest.raises(EngineError):
        async for _ in llm.stream(MESSAGES, max_tokens=5):
            pass
    await llm.aclose()


async def test_unreachable_endpoint_is_an_engine_error() -> None:
    llm = OpenAiLlm(f"http://127.0.0.1:{free_port()}/v1", "m", timeout_s=2)
    with pytest.raises(EngineError, match="failed"):
        async with contextlib.aclosing(llm.stream(MESSAGES, max_tokens=5)) as deltas:
            async for _ in deltas:
                pass
    await llm.aclose()


WEATHER = ToolSpec("get_weather", "The weather in a city.",
                   {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TIME = ToolSpec("get_time", "The current time.")


@pytest.mark.parametrize("mode", ["tool", "tool-whole"])
async def test_tools_are_offered_and_streamed_calls_assembled(endpoint, mode: str) -> None:  # type: ignore[no-untyped-def]
    fake, url = endpoint
    fake.mode = mode
    llm = OpenAiLlm(url, "m", temperature=0.3)
    out = [d async for d in llm.stream(MESSAGES, max_tokens=50, tools=[WEATHER, TIME],
                                       sampling=Sampling(temperature=0.0))]
    await llm.aclose()
    assert out[0] == "Let me check."
    weather, time = out[1:]
    assert weather == ToolCall("call_abc", "get_weather", '{"city": "Paris"}')
    assert isinstance(time, ToolCall) and time.name == "get_time" and time.arguments == "{}"
    if mode == "tool":  # no id came: one is made up
        assert time.call_id.startswith("call_") and len(time.call_id) == 5 + 32
    else:
        assert time.call_id == "call_def"
    req = fake.requests[0]
    assert req["temperature"] == 0.0 and req["tool_choice"] == "auto"
    assert req["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                          "parameters": WEATHER.parameters}},
        {"type": "function", "function": {"name": "get_time", "description": "The current time.",
                                          "parameters": {"type": "object", "properties": {}}}}]


async def test_no_tools_means_no_tool_fields(endpoint) -> None:  # type: ignore[no-untyped-def]
    fake, url = endpoint
    llm = OpenAiLlm(url, "m", temperature=0.3)
    [_ async for _ in llm.stream(MESSAGES, max_tokens=5, sampling=Sampling(tool_choice="required"))]
    await llm.aclose()
    req = fake.requests[0]
    assert "tools" not in req and "tool_choice" not in req and req["temperature"] == 0.3


@pytest.mark.parametrize(("choice", "sent"), [
    ("none", "none"), ("required", "required"),
    ("get_time", {"type": "function", "function": {"name": "get_time"}})])
async def test_tool_choice_is_sent(endpoint, choice: str, sent: object) -> None:  # type: ignore[no-untyped-def]
    fake, url = endpoint
    llm = OpenAiLlm(url, "m")
    [_ async for _ in llm.stream(MESSAGES, max_tokens=5, tools=[TIME], sampling=Sampling(tool_choice=choice))]
    await llm.aclose()
    assert fake.requests[0]["tool_choice"] == sent


async def test_tool_calls_and_results_in_the_history(endpoint) -> None:  # type: ignore[no-untyped-def]
    fake, url = endpoint
    call = ToolCall("call_1", "get_time", "{}")
    history = [*MESSAGES, ChatMessage("user", "And the time?"),
               ChatMessage("assistant", "", tool_calls=(call,)),
               ChatMessage("tool", "10:42", tool_call_id="call_1")]
    llm = OpenAiLlm(url, "m")
    [_ async for _ in llm.stream(history, max_tokens=5, tools=[TIME])]
    await llm.aclose()
    assert fake.requests[0]["messages"][-2:] == [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "10:42"}]
