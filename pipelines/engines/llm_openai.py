"""An OpenAI-compatible chat completions endpoint (vLLM, llama.cpp server, Ollama, ...)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

import httpx

from pipelines.engines.base import ChatMessage, approx_tokens
from streaming.errors import EngineError


def chat_completions_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/chat/completions"


def openai_client(api_key: str | None, timeout_s: float) -> httpx.AsyncClient:
    """An HTTP client for an OpenAI-compatible server (bearer key when one is given)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s))


class OpenAiLlm:
    """Streams ``POST {base_url}/chat/completions`` with ``stream: true`` (server-sent events).

    Network-bound, so it runs on the event loop and not on a compute lane.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 temperature: float = 0.3, timeout_s: float = 30.0) -> None:
        self.name = f"openai:{model}"
        self._url = chat_completions_url(base_url)
        self._model = model
        self._temperature = temperature
        self._client = openai_client(api_key, timeout_s)

    async def prefill(self, messages: Sequence[ChatMessage], *, session: str | None = None) -> None:
        """Nothing to do: servers such as vLLM cache prompt prefixes on their own."""

    def count_tokens(self, text: str) -> int:
        return approx_tokens(text)

    async def stream(self, messages: Sequence[ChatMessage], *, max_tokens: int,
                     session: str | None = None) -> AsyncIterator[str]:
        """Yield reply deltas; closing the iterator closes the HTTP response."""
        body = {
            "model": self._model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": self._temperature,
        }
        try:
            async with self._client.stream("POST", self._url, json=body) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode("utf-8", "replace")[:300]
                    raise EngineError(f"LLM endpoint answered {resp.status_code}: {detail}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        choice = json.loads(data)["choices"][0]
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        raise EngineError(f"LLM endpoint sent a malformed chunk: {data[:200]}") from e
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        yield delta
        except httpx.HTTPError as e:
            raise EngineError(f"LLM endpoint {self._url} failed: {e}") from e

    async def aclose(self) -> None:
        await self._client.aclose()
