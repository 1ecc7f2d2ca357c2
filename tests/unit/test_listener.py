"""The listener's endpoint on a virtual clock (looptime), with scripted engines."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipelines.engines.fakes import FakeAsr, FakeVad
from pipelines.listener import EndpointConfig, Listener, ListenerConfig
from streaming.audio import Float32Array
from streaming.channels import Channel
from streaming.errors import EngineError

pytestmark = pytest.mark.looptime


class Ends:
    """The conversation side: when each utterance was ended (ms of the virtual clock since the
    audio began), and its final."""

    def __init__(self) -> None:
        self.start = asyncio.get_running_loop().time()
        self.stopped: list[float] = []
        self.finals: list[str | None] = []

    def on_speech_started(self, t_ms: int) -> int:
        return len(self.stopped) + 1

    def on_speech_stopped(self, t_ms: int) -> None:
        self.stopped.append((asyncio.get_running_loop().time() - self.start) * 1000)

    def on_final(self, turn_id: int, text: str | None, language: str | None,
                 speech_end: float) -> None:
        self.finals.append(text)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda *args: None  # on_voice, on_partial, on_tentative … : not needed here


async def listen(asr: FakeAsr, audio: Float32Array, adaptive: bool = True,
                 zh_statement_ms: int | None = None, language: str | None = None) -> Ends:
    ends = Ends()
    endpoint = EndpointConfig(adaptive=adaptive, zh_statement_ms=zh_statement_ms)
    listener = Listener(FakeVad(), asr, ends,  # type: ignore[arg-type]
                        ListenerConfig(endpoint=endpoint), language=language)
    channel: Channel[Float32Array] = Channel(100)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(listener.run(channel, tg))
        for i in range(0, audio.size, 512):
            await channel.put(audio[i:i + 512])
            await asyncio.sleep(512 / 16_000)
        channel.close()
        await task
    return ends


async def test_a_question_heard_early_does_not_end_the_turn_after_more_words() -> None:
    """A partial that reads as a question ("Is it?") set the short question silence; the
    person went on ("… true that I went home and") and paused: the early text says nothing
    about how the words ended, so the turn waits the normal silence (then the speculative
    final's "…and" makes it wait longer), not the question's 350 ms."""
    asr = FakeAsr(lambda a: "Is it?" if a.size < 24_000 else "Is it true that I went home and",
                  latency_s=0.6)
    voice = np.full(32_000, 0.1, np.float32)  # 2 s of "speech", then 1.5 s of silence
    ends = await listen(asr, np.concatenate([voice, np.zeros(24_000, np.float32)]))
    assert len(ends.stopped) == 1
    assert ends.stopped[0] - 2000 > 450  # the normal 500 ms (in 32 ms frames), not 350
    assert ends.finals == ["Is it true that I went home and"]


async def test_a_question_at_the_end_still_ends_the_turn_sooner() -> None:
    asr = FakeAsr("Is it true?", latency_s=0.05)
    voice = np.full(16_000, 0.1, np.float32)  # 1 s, then silence
    ends = await listen(asr, np.concatenate([voice, np.zeros(24_000, np.float32)]))
    adaptive = ends.stopped[0] - 1000
    fixed = (await listen(asr, np.concatenate([voice, np.zeros(24_000, np.float32)]),
                          adaptive=False)).stopped[0] - 1000
    assert adaptive < 500 <= fixed


async def test_mandarin_words_that_neither_ask_nor_trail_off_wait_their_own_silence() -> None:
    """A Mandarin speaker pausing mid-sentence is often transcribed as a finished statement
    (因为 misheard as 英雄): with ``zh_statement_ms`` those words wait longer than the normal
    silence; a Mandarin question and English words do not."""
    voice = np.full(16_000, 0.1, np.float32)  # 1 s, then 1.5 s of silence
    clip = np.concatenate([voice, np.zeros(24_000, np.float32)])

    async def ended_after(text: str) -> float:
        ends = await listen(FakeAsr(text, latency_s=0.05), clip, zh_statement_ms=900)
        return ends.stopped[0] - 1000

    statement = await ended_after("我今天去了商店英雄")
    assert statement > 850  # 900 ms (in 32 ms frames), not the normal 500
    assert await ended_after("你今天去了哪里") < 500  # a question: the question's silence
    assert 450 < await ended_after("I went to the shop today") < 850  # the normal silence
    # a slow transcript (Whisper on Mandarin) comes after the normal silence: the language
    # known for the utterance sets the longer silence from the first silent frame
    slow = await listen(FakeAsr("我今天去了商店", latency_s=0.8), clip, zh_statement_ms=900,
                        language="zh")
    assert slow.stopped[0] - 1000 > 850


async def test_an_asr_failure_at_the_speculative_final_is_an_error_of_that_turn_alone() -> None:
    """The final transcript is asked for at the pause (speculation); when the engine fails
    (a model server down), the turn ends with an error and no text, and the listener goes
    on to hear the next utterance (a failed task of the group would end the session)."""
    failing = {"on": True}

    def script(audio: Float32Array) -> str:
        if failing["on"]:
            raise EngineError("ASR endpoint failed: ConnectError")
        return "What time is it?"

    errors: list[str] = []
    asr = FakeAsr(script, latency_s=0.05)
    voice, pause = np.full(16_000, 0.1, np.float32), np.zeros(24_000, np.float32)
    ends = Ends()
    ends.on_error = errors.append  # type: ignore[method-assign]
    listener = Listener(FakeVad(), asr, ends,  # type: ignore[arg-type]
                        ListenerConfig(endpoint=EndpointConfig(adaptive=False)))
    channel: Channel[Float32Array] = Channel(100)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(listener.run(channel, tg))
        for utterance in range(2):
            failing["on"] = utterance == 0
            audio = np.concatenate([voice, pause])
            for i in range(0, audio.size, 512):
                await channel.put(audio[i:i + 512])
                await asyncio.sleep(512 / 16_000)
        channel.close()
        await task
    assert {str(e) for e in errors} == {"ASR endpoint failed: ConnectError"}  # partial and final
    assert ends.finals == [None, "What time is it?"]
