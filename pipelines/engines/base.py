"""One small Protocol per model capability. Real engines and fakes implement them side by side."""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pipelines.compute import Priority
from streaming.audio import Float32Array
from streaming.images import Image


class VadStream(Protocol):
    """Speech probability of consecutive frames of one audio stream (keeps that stream's state)."""

    def __call__(self, frame: Float32Array) -> float: ...


class Vad(Protocol):
    frame_samples: int  # samples per frame at 16 kHz

    def new_stream(self) -> VadStream: ...


@dataclass(frozen=True, slots=True)
class AsrResult:
    text: str
    language: str | None = None
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0


class Asr(Protocol):
    name: str

    async def transcribe(
        self, audio: Float32Array, *, language: str | None, priority: Priority,
        session: str | None = None, key: Hashable | None = None,
    ) -> AsrResult:
        """Transcribe 16 kHz mono audio. ``session`` is for fairness; queued work with the same
        ``key`` is superseded by this (it raises Dropped). Cancelling drops a queued request."""
        ...


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


class Llm(Protocol):
    name: str

    def stream(self, messages: Sequence[ChatMessage], *, max_tokens: int,
               session: str | None = None) -> AsyncIterator[str]:
        """Text deltas of the assistant's reply. Closing the iterator stops generation."""
        ...

    def count_tokens(self, text: str) -> int: ...

    async def prefill(self, messages: Sequence[ChatMessage], *, session: str | None = None) -> None:
        """Optionally pre-compute the prompt's KV cache (a prompt that starts the same way
        later costs only its new tokens). Background work; may do nothing."""
        ...


class EndOfTurn(Protocol):
    name: str

    async def complete(self, audio: Float32Array, *, session: str | None = None) -> float:
        """The probability that an utterance (16 kHz mono, ending in the silence now) is a
        finished turn."""
        ...


class Tts(Protocol):
    name: str
    sample_rate: int

    async def synthesize(self, text: str, *, priority: Priority, session: str | None = None,
                         language: str | None = None) -> Float32Array:
        """Mono float32 audio at ``sample_rate`` for one chunk of text. ``language`` is the
        reply's language (a set of voices picks one by it). Cancelling drops it."""
        ...


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (≈4 characters per token), for backends that expose none."""
    return max(1, (len(text) + 3) // 4)


class Vlm(Protocol):
    """Vision: one short description of an image, or an answer about it."""

    name: str

    async def look(self, image: Image, *, question: str | None = None,
                   priority: Priority = Priority.VISION, session: str | None = None,
                   key: Hashable | None = None) -> str:
        """Text about an RGB image. Background work unless ``priority`` says otherwise;
        queued work with the same ``key`` is superseded (Dropped). Cancelling drops it."""
        ...
