"""Barge-in end to end with the real models: a server in this process (so the test can read the
session's history) and a WebSocket client whose microphone is a simulated room — the reply
plays from a loudspeaker and leaks back into the microphone unless the room is quiet."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web

from client.common.acoustics import EchoRoom, live_microphone
from client.common.eventlog import TurnRecord
from client.common.ws_client import VoxlensClient
from pipelines.bargein import CUT_MARK
from pipelines.compute import Priority
from pipelines.session import Session
from pipelines.text import main_script
from server.app import create_app
from server.launch import free_port
from server.settings import Settings
from server.state import STATE
from streaming.audio import resample
from tests.conftest import speak, until

pytestmark = pytest.mark.asyncio(loop_scope="module")

QUESTION = "Tell me about the city of Paris."


class App:
    def __init__(self, app: web.Application, url: str) -> None:
        self.app = app
        self.url = url

    def session(self, session_id: str) -> Session:
        return self.app[STATE].sessions[session_id]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app() -> AsyncIterator[App]:
    settings = Settings(llm={"temperature": 0})  # type: ignore[arg-type]
    application = create_app(settings)
    runner = web.AppRunner(application)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await until(lambda: application[STATE].engines is not None
                or application[STATE].load_error is not None, timeout_s=300)
    assert application[STATE].load_error is None
    yield App(application, f"ws://127.0.0.1:{port}/ws")
    await runner.cleanup()


@pytest.fixture(scope="module")
def lines(voice) -> Iterator[dict[str, np.ndarray]]:  # type: ignore[no-untyped-def]
    """The person's lines, spoken by the packaged piper voice, at 16 kHz."""
    out = {}
    for key, text in {"question": QUESTION, "spain": "Stop. What is the capital of Spain?",
                      "yeah": "Yeah."}.items():
        audio, rate = speak(voice, text)
        out[key] = resample(audio, rate, 16_000)
    yield out


@contextlib.asynccontextmanager
async def conversation(app: App, room: EchoRoom, *, client_aec: bool, language: str = "en"
                       ) -> AsyncIterator[VoxlensClient]:
    async with VoxlensClient(app.url) as client:
        await client.start(language=language, output_audio={"sample_rate": 24_000},
                           audio={"sample_rate": 16_000, "echo_cancellation": client_aec})
        mic = asyncio.create_task(live_microphone(client, room))
        try:
            yield client
        finally:
            mic.cancel()
            await asyncio.gather(mic, return_exceptions=True)


async def ask(client: VoxlensClient, room: EchoRoom, audio: np.ndarray, heard_ms: float
              ) -> TurnRecord:
    """Say the question; return the reply once ``heard_ms`` of it has played."""
    room.say(np.concatenate([audio, np.zeros(16_000, np.float32)]))
    await client.wait_for(lambda: any(t.audio for t in client.turns.values()), timeout_s=60)
    reply = next(t for t in client.turns.values() if t.audio)
    await until(lambda: client.played_ms(reply.turn_id) >= heard_ms
                or reply.interrupted is not None, timeout_s=60)
    return reply


def played_all(client: VoxlensClient, reply: TurnRecord) -> bool:
    return client.played_ms(reply.turn_id) >= len(reply.audio) / 48 - 20


def finals(client: VoxlensClient) -> list[str]:
    return [e["text"] for e in client.events if e["type"] == "transcript" and e["final"]]


def user_turns_after(client: VoxlensClient, turn_id: int) -> list[int]:
    return [e["turn_id"] for e in client.events
            if e["type"] == "transcript" and e["final"] and e["turn_id"] > turn_id]


async def test_speaking_over_the_reply_interrupts_it(app: App, lines: dict[str, np.ndarray]) -> None:
    room = EchoRoom(24_000, gain_db=-90)  # headphones: nothing leaks back
    async with conversation(app, room, client_aec=True) as client:
        reply = await ask(client, room, lines["question"], 1500)
        assert reply.interrupted is None
        room.say(lines["spain"])
        await client.wait_for(lambda: reply.interrupted is not None, timeout_s=30)
        cut = reply.interrupted
        assert cut is not None and cut.turn_id == reply.turn_id
        await client.wait_for(lambda: any(t.done for t in client.turns.values()), timeout_s=60)
        session = app.session(client.ready["session_id"])  # type: ignore[index]
        history = list(session.history.pairs())
    # heard 1 s and more: at most what reached the client (it plays out what it has while the
    # reply is paused, so all of it when the cut comes late)
    assert 1000 <= cut.played_ms <= len(reply.audio) / 48 + 1
    assert reply.text.strip().startswith(cut.heard_text) and cut.heard_text
    assert len(cut.heard_text) < len(reply.text.strip())
    assert reply.late_audio == 0  # nothing of the interrupted reply after reply.interrupted
    assert not reply.done
    second = next(t for t in client.turns.values() if t.done)
    assert "spain" in (second.transcript or "").lower()
    assert history[:2] == [("user", finals(client)[0]), ("assistant", cut.heard_text + CUT_MARK)]
    assert history[2] == ("user", second.transcript)


async def test_headphones_the_client_did_not_declare_do_not_bend_words_over_the_reply(
        app: App, lines: dict[str, np.ndarray]) -> None:
    """A client that declares no echo cancellation but hears no echo: after a few seconds of
    the reply over room noise the server's echo canceller lets its audio pass as it came
    (streaming/echo.py, "No echo at all"), so words said over the rest of the reply are heard
    as said (AEC3, finding no echo, bent them: "Stop, what is the capital of Spain?" came out
    as "Ah, ethanol.", bench/echo.py)."""
    room = EchoRoom(24_000, gain_db=-90)
    async with conversation(app, room, client_aec=False) as client:
        reply = await ask(client, room, lines["question"], 3500)
        assert reply.interrupted is None
        room.say(lines["spain"])
        await client.wait_for(lambda: reply.interrupted is not None, timeout_s=30)
        await client.wait_for(lambda: any(t.done for t in client.turns.values()), timeout_s=60)
    second = next(t for t in client.turns.values() if t.done)
    said = "".join(c for c in (second.transcript or "").lower() if c.isalpha() or c == " ")
    assert said.split() == "stop what is the capital of spain".split(), second.transcript


@pytest.mark.parametrize("sound", ["backchannel", "noise burst"])
async def test_a_backchannel_or_a_noise_burst_does_not_interrupt(
        app: App, lines: dict[str, np.ndarray], sound: str) -> None:
    room = EchoRoom(24_000, gain_db=-90)
    async with conversation(app, room, client_aec=True) as client:
        reply = await ask(client, room, lines["question"], 1200)
        if sound == "backchannel":
            room.say(lines["yeah"])
        else:
            rng = np.random.default_rng(1)
            room.say((rng.normal(0, 0.3, 2400)).astype(np.float32))  # 150 ms, loud
        await client.wait_for(lambda: reply.done, timeout_s=60)
        await until(lambda: played_all(client, reply), timeout_s=60)
    assert reply.interrupted is None
    assert user_turns_after(client, reply.turn_id) == []  # "yeah" was not a new turn
    assert len(reply.audio) / 48 >= 1200 + 500  # the reply went on after the sound


@pytest.mark.parametrize("with_person", [False, True], ids=["echo only", "person over echo"])
async def test_echo_at_minus_6_db_is_not_the_person(app: App, lines: dict[str, np.ndarray],
                                                    with_person: bool) -> None:
    room = EchoRoom(24_000, delay_ms=80, gain_db=-6, noise_db=-50)  # a speaker, no headphones
    async with conversation(app, room, client_aec=False) as client:
        reply = await ask(client, room, lines["question"], 1500)
        if with_person:
            room.say(lines["spain"])
            await client.wait_for(lambda: reply.interrupted is not None, timeout_s=30)
            await client.wait_for(lambda: any(t.done for t in client.turns.values()),
                                  timeout_s=60)
        else:
            await client.wait_for(lambda: reply.done, timeout_s=60)
            await until(lambda: played_all(client, reply), timeout_s=60)
            await asyncio.sleep(1.5)  # the echo tail is over
    if with_person:
        assert reply.interrupted is not None
        second = next(t for t in client.turns.values() if t.done)
        assert "spain" in (second.transcript or "").lower()
    else:
        assert reply.interrupted is None  # it did not interrupt itself
        assert user_turns_after(client, reply.turn_id) == []  # nor answer its own words


# A client without echo cancellation plays the reply as it arrives (on the server's schedule,
# or later after a jitter buffer) through a small room back into its live microphone: the
# reply must never cut itself off nor answer its own words (issue 17: 3 of 8 replies were).
ECHO_ROOMS = [(0, -6), (250, 0), (80, -12), (700, -6)]


@pytest.mark.parametrize(("delay_ms", "gain_db"), ECHO_ROOMS)
async def test_the_reply_never_interrupts_itself_on_its_echo(app: App, delay_ms: int,
                                                             gain_db: int) -> None:
    room = EchoRoom(24_000, delay_ms=delay_ms, gain_db=gain_db, noise_db=-50)
    async with conversation(app, room, client_aec=False) as client:
        await client.say("Tell me about the history of Paris in three sentences.")
        await client.wait_for(lambda: any(t.audio for t in client.turns.values()), timeout_s=60)
        reply = next(t for t in client.turns.values() if t.audio)
        await client.wait_for(lambda: reply.done or reply.interrupted is not None, timeout_s=90)
        await until(lambda: played_all(client, reply) or reply.interrupted is not None,
                    timeout_s=60)
        await asyncio.sleep(1.5)  # the echo tail is over
    assert reply.interrupted is None, reply.interrupted
    assert finals(client) == []  # no user turn was made of the echo
    assert len(reply.audio) / 48 > 5000  # a reply long enough to have echoed a while


async def test_manual_interrupt_and_one_during_the_first_chunk(app: App) -> None:
    async with VoxlensClient(app.url) as client:
        await client.say("Tell me about the city of Paris.")
        await client.wait_for(lambda: any(t.audio for t in client.turns.values()), timeout_s=60)
        first = next(t for t in client.turns.values() if t.audio)
        await until(lambda: client.played_ms(first.turn_id) >= 800, timeout_s=30)
        await client.interrupt()
        await client.wait_for(lambda: first.interrupted is not None, timeout_s=10)
        # a reply interrupted before any of its audio was made
        await client.say("Tell me about the city of Rome.")
        await client.wait_for(lambda: len(client.turns) >= 2 and any(
            t.text and t.turn_id != first.turn_id for t in client.turns.values()), timeout_s=60)
        second = next(t for t in client.turns.values() if t.turn_id != first.turn_id)
        early = not second.audio
        await client.interrupt()
        await client.wait_for(lambda: second.interrupted is not None, timeout_s=10)
        await asyncio.sleep(1.0)
    assert first.interrupted is not None and first.interrupted.played_ms >= 600
    assert first.late_audio == 0 and second.late_audio == 0
    assert second.interrupted is not None
    if early:  # the usual case: text streams before the first chunk's audio is synthesized
        assert second.interrupted.played_ms == 0 and second.interrupted.heard_text == ""
        assert not second.audio


async def test_interrupt_at_the_very_end_of_a_reply(app: App) -> None:
    async with VoxlensClient(app.url) as client:
        await client.say("Say hello.")
        reply = await client.wait_reply(timeout_s=60)  # reply.done: all its audio was sent
        await client.interrupt()  # while the client still plays the last ~200 ms
        await until(lambda: reply.interrupted is not None
                    or client.played_ms(reply.turn_id) >= len(reply.audio) / 48, timeout_s=10)
        await asyncio.sleep(0.5)
    # either the interrupt caught the last words (and history keeps nearly all of it) or the
    # reply had finished playing: never an error, never a second reply
    assert not client.errors
    if reply.interrupted is not None:
        heard = reply.interrupted.heard_text
        assert reply.text.strip().startswith(heard) and len(heard) >= len(reply.text.strip()) // 2


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def zh_lines(app: App) -> dict[str, np.ndarray]:
    """The person's Mandarin lines, said by the server's own Mandarin voice, at 16 kHz."""
    voices = app.app[STATE].engines.tts  # type: ignore[union-attr]
    out = {}
    for key, text in {"question": "请介绍一下北京这座城市。", "stop": "等一下，停。",
                      "mm": "嗯。", "wait": "等一下，上海有多少人？"}.items():
        audio = await voices.synthesize(text, priority=Priority.TTS_FIRST, language="zh")
        out[key] = resample(audio, voices.sample_rate, 16_000)
    return out


@pytest.mark.parametrize("case", ["stop", "mm", "echo", "stop over echo"])
async def test_mandarin_barge_in(app: App, zh_lines: dict[str, np.ndarray], case: str) -> None:
    """The same rules with Chinese text: "等一下，停" cuts a Mandarin reply, also over its
    echo from a loudspeaker, "嗯" does not, and the reply's own voice coming back is not the
    person."""
    echo = "echo" in case
    room = (EchoRoom(24_000, delay_ms=80, gain_db=-6, noise_db=-50) if echo
            else EchoRoom(24_000, gain_db=-90))
    async with conversation(app, room, client_aec=not echo, language="zh") as client:
        reply = await ask(client, room, zh_lines["question"], 1500)
        if case.startswith("stop"):
            room.say(zh_lines["wait" if echo else "stop"])
            await client.wait_for(lambda: reply.interrupted is not None, timeout_s=30)
            await client.wait_for(lambda: any(t.done for t in client.turns.values()),
                                  timeout_s=60)
        else:
            if case == "mm":
                room.say(zh_lines["mm"])
            await client.wait_for(lambda: reply.done, timeout_s=60)
            await until(lambda: played_all(client, reply), timeout_s=60)
            await asyncio.sleep(1.5)  # the echo tail is over
    assert main_script(reply.text) == "han", reply.text
    if case.startswith("stop"):
        cut = reply.interrupted
        assert cut is not None and cut.heard_text and reply.text.startswith(cut.heard_text)
        assert len(cut.heard_text) < len(reply.text.strip())
        second = next(t for t in client.turns.values() if t.done)
        said = second.transcript or ""
        # the person's words, not the reply's (Whisper base may hear 上海 as 伤害)
        assert ("多少" in said) if echo else ("停" in said or "等" in said), second
    else:
        assert reply.interrupted is None, reply.interrupted
        assert user_turns_after(client, reply.turn_id) == [], finals(client)
