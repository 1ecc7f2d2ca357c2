"""Scripted fake engines for tests about the logic around models (never in the product path)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Hashable, Sequence

import numpy as np

from pipelines.compute import Priority
from pipelines.engines.base import (
    DEFAULT_SAMPLING,
    AsrResult,
    ChatMessage,
    Sampling,
    ToolCall,
    ToolSpec,
    approx_tokens,
)
from streaming.audio import Float32Array


class FakeVad:
    """Energy gate: a frame is speech when its RMS exceeds ``level``."""

    frame_samples = 512

    def __init__(self, level: float = 0.02) -> None:
        self.level = level
        self.frames = 0

    def new_stream(self) -> Callable[[Float32Array], float]:
        def prob(frame: Float32Array) -> float:
            self.frames += 1
            return 1.0 if float(np.sqrt(np.mean(frame**2))) > self.level else 0.0
        return prob


class FakeTurn:
    """An end-of-turn model that finds every utterance finished with ``probability``, after
    ``latency_s``."""

    name = "fake-turn"

    def __init__(self, probability: float, latency_s: float = 0.05) -> None:
        self.probability = probability
        self.latency_s = latency_s
        self.calls: list[int] = []  # samples of each utterance asked about

    async def complete(self, audio: Float32Array, *, session: str | None = None) -> float:
        self.calls.append(audio.size)
        await asyncio.sleep(self.latency_s)
        return self.probability


class FakeAsr:
    """Answers from a script (a fixed text or a function of the audio) after ``latency_s``."""

    name = "fake-asr"

    def __init__(self, text: str | Callable[[Float32Array], str] = "hello there",
                 latency_s: float = 0.2, language: str = "en") -> None:
        self._text = text
        self.latency_s = latency_s
        self.language = language
        self.calls: list[tuple[int, Priority]] = []  # (samples, priority)

    async def transcribe(self, audio: Float32Array, *, language: str | None,
                         priority: Priority, session: str | None = None,
                         key: Hashable | None = None) -> AsrResult:
        self.calls.append((audio.size, priority))
        await asyncio.sleep(self.latency_s)
        text = self._text(audio) if callable(self._text) else self._text
        return AsrResult(text, language or self.language, 0.01, -0.2)


Script = str | ToolCall | list[str | ToolCall]


class FakeLlm:
    """Streams a scripted reply word by word, ``token_s`` apart, after ``first_token_s``; a
    ToolCall in the script is yielded as it is (at its place)."""

    name = "fake-llm"

    def __init__(self, reply: Script | Callable[[Sequence[ChatMessage]], Script] = "Sure. Here it is.",
                 first_token_s: float = 0.1, token_s: float = 0.02) -> None:
        self._reply = reply
        self.first_token_s = first_token_s
        self.token_s = token_s
        self.prompts: list[list[ChatMessage]] = []
        self.prefills: list[list[ChatMessage]] = []
        self.tools: list[list[ToolSpec]] = []  # the tools offered with each prompt
        self.samplings: list[Sampling] = []

    async def prefill(self, messages: Sequence[ChatMessage], *, session: str | None = None,
                      tools: Sequence[ToolSpec] = ()) -> None:
        self.prefills.append(list(messages))

    def count_tokens(self, text: str) -> int:
        return approx_tokens(text)

    async def stream(self, messages: Sequence[ChatMessage], *, max_tokens: int,
                     session: str | None = None, tools: Sequence[ToolSpec] = (),
                     sampling: Sampling = DEFAULT_SAMPLING) -> AsyncIterator[str | ToolCall]:
        self.prompts.append(list(messages))
        self.tools.append(list(tools))
        self.samplings.append(sampling)
        script = self._reply(messages) if callable(self._reply) else self._reply
        await asyncio.sleep(self.first_token_s)
        n = 0
        for part in script if isinstance(script, list) else [script]:
            if isinstance(part, ToolCall):
                yield part
                continue
            for word in part.split(" "):
                if n >= max_tokens or not word:
                    continue
                yield word if n == 0 else " " + word
                n += 1
                await asyncio.sleep(self.token_s)


class FakeTts:
    """A 220 Hz tone lasting ``ms_per_char`` per character, after ``latency_s``."""

    name = "fake-tts"

    def __init__(self, sample_rate: int = 16_000, ms_per_char: float = 60.0,
                 latency_s: float = 0.05) -> None:
        self.sample_rate = sample_rate
        self.ms_per_char = ms_per_char
        self.latency_s = latency_s
        self.calls: list[tuple[str, Priority]] = []
        self.languages: list[str | None] = []

    async def synthesize(self, text: str, *, priority: Priority, session: str | None = None,
                         language: str | None = None) -> Float32Array:
        self.calls.append((text, priority))
        self.languages.append(language)
        await asyncio.sleep(self.latency_s)
        n = int(self.sample_rate * self.ms_per_char * len(text) / 1000)
        t = np.arange(n, dtype=np.float32) / self.sample_rate
        return (0.3 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)
