"""An OpenAI-compatible chat completions endpoint (vLLM, llama.cpp server, Ollama, ...)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from pipelines.engines.base import DEFAULT_SAMPLING, ChatMessage, Sampling, ToolCall, ToolSpec, approx_tokens
from streaming.errors import EngineError

log = logging.getLogger(__name__)

TOOL_CHOICES = ("auto", "none", "required")


def chat_completions_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/chat/completions"


def openai_client(api_key: str | None, timeout_s: float) -> httpx.AsyncClient:
    """An HTTP client for an OpenAI-compatible server (bearer key when one is given)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s))


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex


def wire_message(m: ChatMessage) -> dict[str, Any]:
    """A message in the chat-completions request shape (tool calls and tool results included)."""
    if m.role == "tool":
        return {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content}
    if m.role == "assistant" and m.tool_calls:
        return {"role": "assistant", "content": m.content or None,
                "tool_calls": [{"id": c.call_id, "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments}}
                               for c in m.tool_calls]}
    return {"role": m.role, "content": m.content}


def wire_tool(tool: ToolSpec) -> dict[str, Any]:
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": dict(tool.parameters)}}


def wire_tool_choice(choice: str) -> str | dict[str, Any]:
    """"auto", "none" and "required" as they are; any other value names the one tool to call."""
    return choice if choice in TOOL_CHOICES else {"type": "function", "function": {"name": choice}}


class _CallFragments:
    """One streamed tool call, assembled from its ``delta.tool_calls`` fragments: the id and
    name come with the first, the arguments' JSON text in pieces."""

    def __init__(self) -> None:
        self.call_id = ""
        self.name = ""
        self.arguments: list[str] = []

    def add(self, fragment: dict[str, Any]) -> None:
        self.call_id = self.call_id or fragment.get("id") or ""
        function = fragment.get("function") or {}
        self.name = self.name or function.get("name") or ""
        self.arguments.append(function.get("arguments") or "")

    def call(self) -> ToolCall:
        return ToolCall(self.call_id or new_call_id(), self.name, "".join(self.arguments) or "{}")


class _Calls:
    """The tool calls of one streamed reply, in the order they began."""

    def __init__(self) -> None:
        self._calls: list[_CallFragments] = []
        self._by_index: dict[int, _CallFragments] = {}

    def add(self, fragments: list[dict[str, Any]]) -> None:
        for position, fragment in enumerate(fragments):
            index = int(fragment.get("index", position))
            call = self._by_index.get(index)
            # a server that numbers every whole call 0 starts a new one with a new id
            if call is None or (fragment.get("id") and call.call_id not in ("", fragment["id"])):
                call = self._by_index[index] = _CallFragments()
                self._calls.append(call)
            call.add(fragment)

    def done(self) -> list[ToolCall]:
        named = [c.call() for c in self._calls if c.name]
        if len(named) < len(self._calls):
            log.warning("LLM endpoint streamed %d tool call(s) without a name; dropped",
                        len(self._calls) - len(named))
        return named


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

    async def prefill(self, messages: Sequence[ChatMessage], *, session: str | None = None,
                      tools: Sequence[ToolSpec] = ()) -> None:
        """Nothing to do: servers such as vLLM cache prompt prefixes on their own."""

    def count_tokens(self, text: str) -> int:
        return approx_tokens(text)

    async def stream(self, messages: Sequence[ChatMessage], *, max_tokens: int,
                     session: str | None = None, tools: Sequence[ToolSpec] = (),
                     sampling: Sampling = DEFAULT_SAMPLING,
                     ) -> AsyncIterator[str | ToolCall]:
        """Yield reply deltas, then a ToolCall per tool called (assembled from the streamed
        fragments, in the order the calls began); closing the iterator closes the response."""
        temperature = self._temperature if sampling.temperature is None else sampling.temperature
        body: dict[str, Any] = {
            "model": self._model,
            "messages": [wire_message(m) for m in messages],
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if tools:
            body["tools"] = [wire_tool(t) for t in tools]
            body["tool_choice"] = wire_tool_choice(sampling.tool_choice)
        calls = _Calls()
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
                        break
                    try:
                        choice = json.loads(data)["choices"][0]
                        delta = choice.get("delta") or {}
                        calls.add(delta.get("tool_calls") or [])
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                        raise EngineError(f"LLM endpoint sent a malformed chunk: {data[:200]}") from e
                    text = delta.get("content")
                    if text:
                        yield text
                    if choice.get("finish_reason"):
                        break
        except httpx.HTTPError as e:
            raise EngineError(f"LLM endpoint {self._url} failed: {e}") from e
        for call in calls.done():
            yield call

    async def aclose(self) -> None:
        await self._client.aclose()
