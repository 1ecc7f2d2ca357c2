"""A GGUF chat model through llama-cpp-python, generating on the ``llm`` lane."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from llama_cpp import Llama

from pipelines.compute import Compute, Priority
from pipelines.engines.base import ChatMessage
from streaming.errors import EngineError


class LlamaLlm:
    def __init__(
        self,
        model_path: Path,
        compute: Compute,
        *,
        n_ctx: int = 2048,
        threads: int = 2,
        temperature: float = 0.3,
        name: str | None = None,
    ) -> None:
        self.name = name or f"llama.cpp:{model_path.name}"
        self._compute = compute
        self._temperature = temperature
        self._llama = Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=threads,
                            n_threads_batch=threads, verbose=False)

    def warm_up(self, system_prompt: str) -> None:
        """One tiny completion: pays lazy initialisation and leaves the system prompt in the
        KV cache, which llama.cpp reuses for every prompt that starts with it."""
        self._evaluate(_payload([ChatMessage("system", system_prompt), ChatMessage("user", "Hi")]))

    async def prefill(self, messages: Sequence[ChatMessage], *, session: str | None = None) -> None:
        """Evaluate a prompt ahead of time at background priority. llama.cpp keeps the
        evaluated tokens, so the real prompt pays only for the tokens that differ. One context
        holds one prompt, so a newer prefill (of any session) supersedes a queued one."""
        await self._compute.call("llm", Priority.ASR_PARTIAL, self._evaluate, _payload(messages),
                                 session=session, key="prefill")

    def _evaluate(self, payload: Any) -> None:
        self._llama.create_chat_completion(payload, max_tokens=1)

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def stream(self, messages: Sequence[ChatMessage], *, max_tokens: int,
               session: str | None = None) -> AsyncIterator[str]:
        """Reply deltas. Closing the iterator stops llama.cpp before its next token."""
        payload = _payload(messages)

        def generate() -> Iterator[str]:
            try:
                chunks: Any = self._llama.create_chat_completion(
                    payload, stream=True, max_tokens=max_tokens, temperature=self._temperature)
                for chunk in chunks:
                    delta = chunk["choices"][0]["delta"].get("content")
                    if delta:
                        yield delta
            except Exception as e:
                raise EngineError(f"llama.cpp failed: {e}") from e

        return self._compute.iterate("llm", Priority.LLM, generate, session=session)


def _payload(messages: Sequence[ChatMessage]) -> Any:
    """llama-cpp-python's message dicts (typed there as TypedDicts, hence Any)."""
    return [{"role": m.role, "content": m.content} for m in messages]
