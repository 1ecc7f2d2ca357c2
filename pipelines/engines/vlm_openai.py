"""Vision through an OpenAI-compatible chat endpoint that takes images (vLLM serving Qwen2-VL,
llama.cpp server with a multimodal model, Ollama …): the frame goes as a JPEG data URL."""

from __future__ import annotations

import base64
from collections.abc import Hashable

import httpx

from pipelines.compute import Priority
from pipelines.engines.llm_openai import chat_completions_url, openai_client
from streaming.errors import EngineError
from streaming.images import Image, encode_jpeg

DESCRIBE = ("Describe what this camera image shows in one short factual sentence: the main "
            "objects, people and any readable text.")


class OpenAiVlm:
    """Network-bound: runs on the event loop, not on a compute lane (the remote server
    schedules its own GPU). ``priority``/``key`` are accepted for the interface."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 max_tokens: int = 120, timeout_s: float = 30.0) -> None:
        self.name = f"openai-vision:{model}"
        self._url = chat_completions_url(base_url)
        self._model = model
        self._max_tokens = max_tokens
        self._client = openai_client(api_key, timeout_s)

    async def look(self, image: Image, *, question: str | None = None,
                   priority: Priority = Priority.VISION, session: str | None = None,
                   key: Hashable | None = None) -> str:
        url = "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(image)).decode()
        body = {
            "model": self._model,
            "max_tokens": self._max_tokens,
            "temperature": 0.0,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": question or DESCRIBE},
                {"type": "image_url", "image_url": {"url": url}},
            ]}],
        }
        try:
            resp = await self._client.post(self._url, json=body)
        except httpx.HTTPError as e:
            raise EngineError(f"vision endpoint {self._url} failed: {e}") from e
        if resp.status_code != 200:
            raise EngineError(f"vision endpoint answered {resp.status_code}: {resp.text[:300]}")
        try:
            text = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise EngineError(f"vision endpoint sent a malformed answer: {resp.text[:300]}") from e
        if not isinstance(text, str) or not text.strip():
            raise EngineError("vision endpoint sent an empty answer")
        return text.strip()

    async def aclose(self) -> None:
        await self._client.aclose()
