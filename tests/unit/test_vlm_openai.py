"""The OpenAI-compatible vision backend against a local HTTP server that checks the request."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import cv2
import numpy as np
import pytest
from aiohttp import web

from pipelines.engines.vlm_openai import OpenAiVlm
from streaming.errors import EngineError
from tests.conftest import free_port


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[list[dict], str]]:
    seen: list[dict] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        content = body["messages"][0]["content"]
        url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
        assert url.startswith("data:image/jpeg;base64,")
        jpeg = base64.b64decode(url.split(",", 1)[1])
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            return web.json_response({"error": "bad image"}, status=400)
        h, w = image.shape[:2]
        text = next(c["text"] for c in content if c["type"] == "text")
        return web.json_response({"choices": [{"message": {
            "role": "assistant", "content": f"A {w}x{h} picture. You asked: {text}"}}]})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield seen, f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


async def test_sends_the_frame_as_a_data_url_and_returns_the_answer(endpoint) -> None:  # type: ignore[no-untyped-def]
    seen, url = endpoint
    vlm = OpenAiVlm(url, "qwen2-vl-7b", api_key="k")
    image = np.zeros((120, 160, 3), np.uint8)
    assert (await vlm.look(image)).startswith("A 160x120 picture. You asked: Describe")
    assert await vlm.look(image, question="What colour is it?") == \
        "A 160x120 picture. You asked: What colour is it?"
    await vlm.aclose()
    assert seen[0]["model"] == "qwen2-vl-7b" and seen[0]["max_tokens"] > 0
    assert [c["type"] for c in seen[0]["messages"][0]["content"]] == ["text", "image_url"]


async def test_failures_become_engine_errors() -> None:
    vlm = OpenAiVlm(f"http://127.0.0.1:{free_port()}/v1", "m", timeout_s=2)
    with pytest.raises(EngineError, match="failed"):
        await vlm.look(np.zeros((8, 8, 3), np.uint8))
    await vlm.aclose()
