"""Conversation logic with scripted fake engines on a virtual clock (looptime): no real time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest

from pipelines.engines.base import DEFAULT_SAMPLING, ChatMessage, Sampling, ToolCall, ToolSpec
from pipelines.engines.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad
from pipelines.prompt import LANGUAGE_HINTS
from pipelines.session import Engines, Session, SessionConfig
from pipelines.text import main_script
from pipelines.voices import Voices
from streaming.errors import EngineError
from streaming.events import (
    Error,
    Event,
    Metrics,
    ReplyDone,
    ReplyStarted,
    SpeechStopped,
    Transcript,
)
from tests.unit.transport import serve

pytestmark = pytest.mark.looptime

CHUNK = 320  # 20 ms at 16 kHz


def tone(ms: int) -> np.ndarray:
    t = np.arange(16 * ms) / 16000
    return (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)


def silence(ms: int) -> np.ndarray:
    return np.zeros(16 * ms, dtype=np.float32)


async def speak(session: Session, *parts: np.ndarray) -> None:
    """Stream audio in 20 ms chunks in (virtual) real time."""
    audio = np.concatenate(parts)
    for i in range(0, audio.size, CHUNK):
        await session.push_audio(audio[i:i + CHUNK])
        await asyncio.sleep(0.02)


class Harness:
    """A transport's view of a session: its events as they come, its reply audio as a client
    takes it (real time, 200 ms ahead), with the events that follow that audio."""

    def __init__(self, session: Session, log: list[str]) -> None:
        self.session = session
        self.events: list[Event] = []
        self.audio = bytearray()
        self.log = log

    async def collect(self) -> None:
        await serve(self.session, self._got, self.audio.extend)

    def _got(self, ev: Event) -> None:
        self.events.append(ev)
        self.log.append(type(ev).__name__)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    log: list[str] = []

    def reply(messages: Sequence[ChatMessage]) -> str:
        log.append("llm")
        return "Sure, the answer is forty two. Anything else?"

    engines = Engines(FakeVad(), FakeAsr("what is the answer", latency_s=0.2),
                      FakeLlm(reply), FakeTts())
    session = Session("s1", engines, SessionConfig(), clock=asyncio.get_running_loop().time)
    h = Harness(session, log)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(session.run())
        tg.create_task(h.collect())
        yield h
        session.close()


async def settle(seconds: float = 5.0) -> None:
    await asyncio.sleep(seconds)


async def test_spoken_turn_produces_the_whole_event_sequence(harness: Harness) -> None:
    await speak(harness.session, silence(300), tone(1500), silence(900))
    await settle()
    names = [type(e).__name__ for e in harness.events]
    assert names[:2] == ["SpeechStarted", "Transcript"]  # a partial while speaking
    finals = [t for t in harness.of(Transcript) if t.final]
    assert [t.text for t in finals] == ["what is the answer"]
    assert names.index("SpeechStopped") < names.index("ReplyStarted")
    assert names[-2:] == ["Metrics", "ReplyDone"]  # reply.done is the turn's last event
    done = harness.of(ReplyDone)[0]
    assert done.text == "Sure, the answer is forty two. Anything else?"
    assert len(harness.audio) > 0 and len(harness.audio) % 2 == 0
    stages = harness.of(Metrics)[0].stages
    assert set(stages) == {"turn_started", "prompt_ready", "transcript_final", "llm_first_token",
                           "first_chunk", "tts_first_audio", "first_audio_sent"}
    assert stages["first_audio_sent"] >= stages["tts_first_audio"] >= stages["first_chunk"]
    assert stages["first_chunk"] >= stages["llm_first_token"] >= stages["prompt_ready"] \
        >= stages["turn_started"]
    assert next(harness.session.history.pairs()) == ("user", "what is the answer")


async def test_reply_is_prepared_during_the_endpoint_silence(harness: Harness) -> None:
    # ASR takes 0.2 s, the endpoint needs 0.5 s of silence: the speculative final is ready
    # first, so the LLM is already asked before the endpoint (speech.stopped).
    await speak(harness.session, tone(1200), silence(1000))
    await settle()
    assert harness.log.index("llm") < harness.log.index("SpeechStopped")
    assert len(harness.of(ReplyStarted)) == 1


async def test_speech_resuming_voids_the_speculation(harness: Harness) -> None:
    await speak(harness.session, tone(800), silence(350), tone(800), silence(1000))
    await settle()
    assert len([t for t in harness.of(Transcript) if t.final]) == 1
    assert len(harness.of(ReplyStarted)) == 1  # the voided held turn never spoke
    assert harness.log.count("llm") == 2  # one prepared and dropped, one released
    assert len(harness.of(SpeechStopped)) == 1


async def test_typed_turns_use_history(harness: Harness) -> None:
    harness.session.submit_text("first question")
    await settle()
    harness.session.submit_text("second question")
    await settle()
    assert len(harness.of(ReplyDone)) == 2
    llm = harness.session.engines.llm
    assert isinstance(llm, FakeLlm)
    second_prompt = [(m.role, m.content) for m in llm.prompts[1]]
    assert second_prompt[1:] == [
        ("user", "first question"),
        ("assistant", "Sure, the answer is forty two. Anything else?"),
        ("user", "second question"),
    ]


async def test_whisper_hallucination_on_noise_is_not_a_turn() -> None:
    engines = Engines(FakeVad(), FakeAsr("Thank you.", latency_s=0.1), FakeLlm(), FakeTts())
    session = Session("s2", engines, clock=asyncio.get_running_loop().time)
    h = Harness(session, [])
    async with asyncio.TaskGroup() as tg:
        tg.create_task(session.run())
        tg.create_task(h.collect())
        await speak(session, tone(400), silence(1000))  # a short noise burst
        await settle()
        session.close()
    assert not [t for t in h.of(Transcript) if t.final]
    assert not h.of(ReplyStarted)
    assert isinstance(engines.llm, FakeLlm) and engines.llm.prompts == []


async def test_engine_failure_is_an_error_event_and_the_session_goes_on() -> None:
    class FailingOnceLlm(FakeLlm):
        failed = False

        async def stream(self, messages: Sequence[ChatMessage], *, max_tokens: int,
                         session: str | None = None, tools: Sequence[ToolSpec] = (),
                         sampling: Sampling = DEFAULT_SAMPLING) -> AsyncIterator[str | ToolCall]:
            if not self.failed:
                self.failed = True
                raise EngineError("model crashed")
            async for d in super().stream(messages, max_tokens=max_tokens):
                yield d

    session = Session("s3", Engines(FakeVad(), FakeAsr(), FailingOnceLlm(), FakeTts()),
                      clock=asyncio.get_running_loop().time)
    h = Harness(session, [])
    async with asyncio.TaskGroup() as tg:
        tg.create_task(session.run())
        tg.create_task(h.collect())
        session.submit_text("one")
        await settle()
        session.submit_text("two")
        await settle()
        session.close()
    assert [e.code for e in h.of(Error)] == ["engine_failed"]
    assert [d.text for d in h.of(ReplyDone)] == ["Sure. Here it is."]


async def test_close_mid_reply_cancels_everything() -> None:
    engines = Engines(FakeVad(), FakeAsr(), FakeLlm("word " * 100, token_s=0.1), FakeTts())
    session = Session("s4", engines, clock=asyncio.get_running_loop().time)
    before = set(asyncio.all_tasks())
    runner = asyncio.create_task(session.run())
    session.submit_text("talk a lot")
    await asyncio.sleep(1.0)
    session.close()
    await asyncio.wait_for(runner, 1.0)
    leftover = set(asyncio.all_tasks()) - before - {asyncio.current_task()}
    assert not [t for t in leftover if not t.done()]
    assert session.events.closed


async def test_a_mandarin_turn_is_answered_in_mandarin_by_the_mandarin_voice() -> None:
    """A typed Mandarin turn: the prompt ends with the reminder to answer in Mandarin (the
    history keeps the words alone), and the reply's chunks go to the voice of their script."""
    llm = FakeLlm("巴黎 是 法国 的 首都。 Paris is lovely.")
    en, zh = FakeTts(latency_s=0.01), FakeTts(latency_s=0.01)
    session = Session("zh", Engines(FakeVad(), FakeAsr(), llm, Voices({"en": en, "zh": zh})),
                      SessionConfig(), clock=asyncio.get_running_loop().time)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(session.run())
        session.submit_text("法国的首都是哪里？")
        await asyncio.sleep(5)
        session.submit_text("And in English?")
        await asyncio.sleep(5)
        session.close()
    first, second = llm.prompts
    assert first[-1].content == f"法国的首都是哪里？\n{LANGUAGE_HINTS['zh']}"
    assert second[-1].content == "And in English?"  # no reminder after English words
    assert [t for k, t in session.history.pairs() if k == "user"] == ["法国的首都是哪里？",
                                                                   "And in English?"]
    assert zh.calls and all(main_script(text) == "han" for text, _ in zh.calls)
    assert en.calls and all(main_script(text) == "latin" for text, _ in en.calls)
