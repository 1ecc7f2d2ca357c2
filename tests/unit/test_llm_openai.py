"""The OpenAI-compatible LLM backend against a real local HTTP server that checks the request."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from pipelines.engines.base import ChatMessage
from pipelines.engines.llm_openai import OpenAiLlm
from streaming.errors import EngineError
from tests.conftest import free_port


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
