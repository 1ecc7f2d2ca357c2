"""One assistant reply: LLM stream → chunker → TTS per chunk → reply events and audio, in
order (the audio into the session's playout, the events into its channel)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from pipelines.bargein import CUT_MARK
from pipelines.chunker import Chunker
from pipelines.compute import Priority
from pipelines.engines.base import ChatMessage, Llm, Sampling, ToolCall, ToolSpec, Tts
from pipelines.history import Item
from pipelines.text import main_script
from streaming.audio import float_to_pcm16, resample
from streaming.channels import Channel, ChannelClosed
from streaming.conversation import ReplyOptions
from streaming.events import (
    Event,
    Metrics,
    ReplyDone,
    ReplyStarted,
    ReplyText,
    ToolCallRequested,
)
from streaming.playout import Playout

AUDIO_PIECE_MS = 100  # reply audio goes out in pieces of this length


class _Audio(NamedTuple):
    """A piece of the reply's audio (s16le mono at the output rate), in the turn's outbox."""

    pcm: bytes


@dataclass(frozen=True, slots=True)
class TurnConfig:
    max_tokens: int = 160
    first_chunk_words: int = 4


@dataclass(slots=True)
class SpokenChunk:
    text: str
    duration_ms: float


@dataclass
class Turn:
    """A reply that may be prepared before it is *released* (speculation at the endpoint).

    Nothing reaches the session's event channel or playout before ``release``; a
    turn cancelled before release has said nothing.
    """

    turn_id: int
    user_text: str | None  # None: a reply to the conversation so far (no new words)
    llm: Llm
    tts: Tts
    events: Channel[Event]
    playout: Playout  # where the reply audio goes (the transport drains it)
    output_rate: int
    config: TurnConfig = field(default_factory=TurnConfig)
    clock: Callable[[], float] = time.monotonic
    session_id: str | None = None
    on_metrics: Callable[[dict[str, float]], None] | None = None
    history_text: str | None = None  # the user's words as history keeps them (if not user_text)
    language: str | None = None  # the user's language (detected or set): a voice tie-break
    text: str = ""  # reply text generated so far
    spoken: list[SpokenChunk] = field(default_factory=list)  # chunks whose audio was emitted
    released: asyncio.Event = field(default_factory=asyncio.Event)
    speech_end: float | None = None  # wall time the stage timings count from
    # stage → wall time: turn_started (the turn exists: at the speculative transcript, before
    # the endpoint when it was ready then), prompt_ready, llm_first_token, first_chunk,
    # tts_first_audio, transcript_final (the endpoint: released), first_audio_sent
    marks: dict[str, float] = field(default_factory=dict)
    heard: str | None = None  # set when interrupted: the part of the reply the person heard
    reply_item: Item | None = None  # its entry in the history, once it has one
    options: ReplyOptions = field(default_factory=ReplyOptions)
    tools: Sequence[ToolSpec] = ()  # offered to the LLM
    server_tools: frozenset[str] = frozenset()  # run by the server: not the client's to call
    calls: list[ToolCall] = field(default_factory=list)  # the tools the reply called
    calls_sent: int = 0  # how many of them the client was asked to run

    def __post_init__(self) -> None:
        self._mark("turn_started")

    def reply_for_history(self) -> str:
        """The reply as history keeps it: what was heard, marked where it was cut off. Nothing
        when nothing was heard (a bare mark would teach a small LLM to answer with one)."""
        if self.heard is None:
            return self.text.strip()
        return f"{self.heard}{CUT_MARK}" if self.heard else ""

    def reply_language(self) -> str | None:
        """The language the reply is in so far, by its script; else the user's."""
        script = main_script(self.text)
        if script == "han":
            return "zh"
        if script == "latin" and self.language == "zh":
            return "en"
        return self.language

    def release(self, speech_end: float | None = None) -> None:
        """Let the reply out. ``speech_end`` (wall time) is the zero of its stage timings."""
        self.speech_end = self.clock() if speech_end is None else speech_end
        self.marks.setdefault("transcript_final", self.clock())
        self.released.set()

    def _mark(self, stage: str) -> None:
        self.marks.setdefault(stage, self.clock())

    async def run(self, prompt: Sequence[ChatMessage]) -> str:
        """Generate (from ``prompt``, composed once the turn was due: it may have looked at the
        scene first), speak and emit the reply; returns its text.

        Cancelling it stops the LLM (before its next token) and drops queued TTS
        work; events already handed to the session's channel stay there.
        """
        outbox: Channel[ReplyText | _Audio] = Channel(256)
        chunks: Channel[str] = Channel(32)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._generate(prompt, outbox, chunks))
            tg.create_task(self._speak(chunks, outbox))
            await self._emit(outbox)
        return self.text

    def _deltas(self, prompt: Sequence[ChatMessage]) -> AsyncIterator[str | ToolCall]:
        self._mark("prompt_ready")
        o = self.options
        if o.script is not None:
            return _said(o.script)
        tools = () if o.tool_choice == "none" else self.tools
        return self.llm.stream(prompt, max_tokens=o.max_tokens or self.config.max_tokens,
                               session=self.session_id, tools=tools,
                               sampling=Sampling(o.temperature, o.tool_choice))

    async def _generate(self, prompt: Sequence[ChatMessage], outbox: Channel[ReplyText | _Audio],
                        chunks: Channel[str]) -> None:
        chunker = Chunker(self.config.first_chunk_words)
        deltas = self._deltas(prompt)
        try:
            async for delta in deltas:
                self._mark("llm_first_token")
                if isinstance(delta, ToolCall):
                    self.calls.append(delta)
                    continue
                self.text += delta
                await outbox.put(ReplyText(self.turn_id, delta))
                for chunk in chunker.feed(delta):
                    self._mark("first_chunk")
                    await chunks.put(chunk)
            for chunk in chunker.flush():
                self._mark("first_chunk")
                await chunks.put(chunk)
        finally:
            await _aclose(deltas)  # stops generation now, not when the generator is collected
            chunks.close()

    async def _speak(self, chunks: Channel[str], outbox: Channel[ReplyText | _Audio]) -> None:
        first = True
        piece = self.output_rate * AUDIO_PIECE_MS // 1000
        try:
            async for chunk in chunks:
                if not self.options.speak:
                    self.spoken.append(SpokenChunk(chunk, 0.0))
                    continue
                prio = Priority.TTS_FIRST if first else Priority.TTS_REST
                audio = await self.tts.synthesize(chunk, priority=prio, session=self.session_id,
                                                  language=self.reply_language())
                first = False
                self._mark("tts_first_audio")
                audio = resample(audio, self.tts.sample_rate, self.output_rate)
                for k in range(0, audio.size, piece):
                    await outbox.put(_Audio(float_to_pcm16(audio[k:k + piece])))
                self.spoken.append(SpokenChunk(chunk, audio.size * 1000 / self.output_rate))
        finally:
            outbox.close()

    async def _emit(self, outbox: Channel[ReplyText | _Audio]) -> None:
        await self.released.wait()
        await self.events.put(ReplyStarted(self.turn_id))
        while True:
            try:
                item = await outbox.get()
            except ChannelClosed:
                break
            if isinstance(item, _Audio):
                await self.playout.room()
                self._mark("first_audio_sent")
                self.playout.put(self.turn_id, item.pcm)
            else:
                await self.events.put(item)
        for call in self.calls:  # after the words that led to them
            if call.name not in self.server_tools:
                await self.events.put(ToolCallRequested(self.turn_id, call.call_id, call.name,
                                                        call.arguments))
                self.calls_sent += 1
        base = self.speech_end if self.speech_end is not None else self.clock()
        stages = {k: (v - base) * 1000 for k, v in self.marks.items()}
        if self.on_metrics is not None:
            self.on_metrics(stages)
        # the turn's last events, after its last audio
        for event in (Metrics(self.turn_id, stages), ReplyDone(self.turn_id, self.text.strip())):
            if not self.playout.after_audio(self.turn_id, event):
                await self.events.put(event)


async def _said(text: str) -> AsyncIterator[str | ToolCall]:
    yield text


async def _aclose(iterator: AsyncIterator[str | ToolCall]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
