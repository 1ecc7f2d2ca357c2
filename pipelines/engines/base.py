"""One small Protocol per model capability. Real engines and fakes implement them side by side."""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pipelines.compute import Priority
from streaming.audio import Float32Array
from streaming.conversation import ToolSpec

__all__ = ["ToolSpec"]  # defined with the other shared conversation types (streaming/conversation)
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
class ToolCall:
    """The LLM's request to call a tool; ``arguments`` is JSON text, as the model wrote it."""

    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant message that calls tools
    tool_call_id: str | None = None  # a ``tool`` message: the result of that call


@dataclass(frozen=True, slots=True)
class Sampling:
    """Per-reply overrides of the engine's defaults (None: the engine's own)."""

    temperature: float | None = None
    tool_choice: str = "auto"  # "auto", "none", "required" or a tool's name


DEFAULT_SAMPLING = Sampling()


class Llm(Protocol):
    name: str

    def stream(self, messages: Sequence[ChatMessage], *, max_tokens: int,
               session: str | None = None, tools: Sequence[ToolSpec] = (),
               sampling: Sampling = DEFAULT_SAMPLING) -> AsyncIterator[str | ToolCall]:
        """Text deltas of the assistant's reply, and a ToolCall for each tool it calls (after
        its text, at the end of the reply). Closing the iterator stops generation."""
        ...

    def count_tokens(self, text: str) -> int: ...

    async def prefill(self, messages: Sequence[ChatMessage], *, session: str | None = None,
                      tools: Sequence[ToolSpec] = ()) -> None:
        """Optionally pre-compute the prompt's KV cache (a prompt that starts the same way
        later costs only its new tokens; the tools the reply will be offered are part of
        it). Background work; may do nothing."""
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


class ToolRunner(Protocol):
    """Tools the server runs itself (MCP servers): offered to the LLM next to the client's."""

    def specs(self) -> Sequence[ToolSpec]: ...

    async def call(self, name: str, arguments: str, *, timeout_s: float) -> str:
        """Run a tool with JSON ``arguments``; its result as text. Raises EngineError when the
        tool fails, times out or does not exist. Cancelling it abandons the call."""
        ...
