"""The per-device MQTT adapter with a scripted session, on a virtual clock (looptime)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np
import pytest

from streaming.audio import Float32Array, float_to_pcm16
from streaming.channels import Channel
from streaming.conversation import ToolSpec
from streaming.errors import ProtocolError
from streaming.events import AudioFormat, Event, ReplyDone, ReplyStarted, SessionReady
from streaming.images import Image
from streaming.microphone import EchoMeter
from streaming.mqtt import pack_frame, unpack_frame
from streaming.mqtt_device import ERROR_BURST, INBOX, DeviceAdapter
from streaming.playout import Playout

pytestmark = pytest.mark.looptime

START_SEQ = json.dumps({"type": "session.start", "audio": {"echo_cancellation": True,
                                                           "sequence": True},
                        "output_audio": {"sample_rate": 16000, "sequence": True}}).encode()
START = json.dumps({"type": "session.start", "audio": {"echo_cancellation": True}}).encode()


class ScriptedSession:
    """What the adapter needs of a session (SessionPort), recording what it is given."""

    session_id = "s1"

    def __init__(self) -> None:
        self.events: Channel[Event] = Channel(64)
        self.formats = (16000, 1, 24000)
        self.started = False
        self.audio: list[Float32Array] = []
        self.texts: list[str] = []
        self.playbacks: list[tuple[int, int | None]] = []
        self.closed = False
        self.accepting = asyncio.Event()  # cleared: push_audio waits (a slow listener)
        self.accepting.set()
        self.playout = Playout(24000, release=self.events.put_nowait)
        self.echo: EchoMeter | None = None

    def ready_event(self) -> SessionReady:
        rate, channels, out = self.formats
        return SessionReady(self.session_id, AudioFormat(rate, channels), AudioFormat(out), {})

    def configure(self, *, input_rate: int, input_channels: int, output_rate: int,
                  language: str | None, instructions: str | None,
                  tools: Sequence[ToolSpec] = ()) -> None:
        if self.started:
            raise ProtocolError("session.start must come first", code="bad_state")
        self.formats = (input_rate, input_channels, output_rate)
        self.playout.reconfigure(output_rate)

    def attach_echo(self, meter: EchoMeter | None) -> None:
        self.echo = meter

    async def push_audio(self, audio: Float32Array) -> None:
        self.started = True
        await self.accepting.wait()
        self.audio.append(audio)

    def submit_text(self, text: str) -> None:
        self.started = True
        self.texts.append(text)

    def push_frame(self, image: Image) -> None:
        raise ProtocolError("no vision here", code="unsupported")

    def interrupt(self) -> None:
        pass

    def playback(self, played_ms: int, turn_id: int | None) -> None:
        self.playbacks.append((played_ms, turn_id))

    def close(self) -> None:
        self.closed = True
        self.events.close()

    def samples(self) -> Float32Array:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, dtype=np.float32)


class Wire:
    """The adapter's outlet: what it published, by topic kind."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, int]] = []

    def __call__(self, kind: str, payload: bytes, qos: int) -> None:
        self.sent.append((kind, payload, qos))

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(p) for k, p, _ in self.sent if k == "events"]

    def errors(self) -> list[str]:
        return [e["code"] for e in self.events() if e["type"] == "error"]

    def audio(self) -> list[bytes]:
        return [p for k, p, _ in self.sent if k == "audio/out"]


@contextlib.asynccontextmanager
async def device(restore: Callable[[], bool] | None = None,
                 ) -> AsyncIterator[tuple[DeviceAdapter, ScriptedSession, Wire]]:
    loop = asyncio.get_running_loop()
    session, wire = ScriptedSession(), Wire()
    adapter = DeviceAdapter("kitchen", session, wire, clock=loop.time, restore=restore)
    task = asyncio.create_task(adapter.run())
    try:
        yield adapter, session, wire
    finally:
        session.close()
        await asyncio.wait_for(task, 5)


async def settle() -> None:
    await asyncio.sleep(0.05)


def pcm(values: list[float], n: int = 320) -> list[bytes]:
    """20 ms frames, each of one constant level (easy to recognise after the trip)."""
    return [float_to_pcm16(np.full(n, v, dtype=np.float32)) for v in values]


def levels(audio: Float32Array, n: int = 320) -> list[float]:
    return [round(float(audio[k]), 2) for k in range(0, audio.size, n)]


async def test_start_answers_ready_and_a_repeated_start_resumes() -> None:
    async with device() as (adapter, session, wire):
        adapter.offer("control", START_SEQ)
        await settle()
        ready = wire.events()[-1]
        assert ready["type"] == "session.ready" and ready["resumed"] is False
        assert ready["input"]["sequence"] is True and ready["output"]["sample_rate"] == 16000
        adapter.offer("control", b'{"type": "text", "text": "hi"}')
        adapter.offer("control", START_SEQ)  # the device reconnected: same format
        await settle()
        again = wire.events()[-1]
        assert again["resumed"] is True and again["session_id"] == "s1"
        adapter.offer("control", START)  # another format, mid-conversation: refused
        await settle()
        assert wire.errors() == ["bad_state"]
        assert session.texts == ["hi"]


async def test_numbered_audio_is_reordered_deduplicated_and_gaps_become_silence() -> None:
    async with device() as (adapter, session, wire):
        adapter.offer("control", START_SEQ)
        frames = pcm([0.1 * k for k in range(1, 10)])
        for seq in [1, 0, 2, 2, 4, 3, 5, 6, 8, 0]:  # swapped, duplicated, late; 7 never comes
            adapter.offer("audio/in", pack_frame(seq, frames[seq]))
        await asyncio.sleep(1.0)  # the held frame is played once nothing follows it
        assert levels(session.samples()) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.0, 0.9]
        assert wire.errors() == []


async def test_bad_messages_are_answered_on_the_devices_events_topic_within_a_budget() -> None:
    async with device() as (adapter, _, wire):
        adapter.offer("control", START_SEQ)
        adapter.offer("audio/in", b"\x00\x01")  # shorter than the header
        adapter.offer("audio/in", pack_frame(0, b"\x00\x01\x02"))  # half a sample
        adapter.offer("control", b"\xff\xfe")
        adapter.offer("control", b'{"type": "image", "data": "aGVsbG8="}')
        await settle()
        assert wire.errors() == ["bad_audio", "bad_audio", "bad_message", "bad_image"]
        for _ in range(10):  # garbage in a loop is not echoed in a loop
            adapter.offer("control", b"garbage")
        await settle()
        assert len(wire.errors()) == ERROR_BURST


async def test_a_flood_fills_only_its_bounded_inbox_and_is_reported() -> None:
    async with device() as (adapter, session, wire):
        adapter.offer("control", START)
        await settle()
        session.accepting.clear()  # the session stops taking audio
        accepted = sum(adapter.offer("audio/in", bytes(640)) for _ in range(200))
        assert accepted <= INBOX["audio/in"] + 1  # + the one the adapter is pushing
        assert adapter.offer("control", b'{"type": "text", "text": "still here"}')  # own room
        session.accepting.set()
        await settle()
        busy = [e for e in wire.events() if e.get("code") == "busy"]
        assert busy and "audio/in messages dropped" in busy[0]["message"]
        assert session.texts == ["still here"]


@pytest.mark.looptime(False)  # Playout.paced sleeps for float differences below looptime's step
async def test_reply_audio_is_paced_and_numbered() -> None:
    async with device() as (adapter, session, wire):
        adapter.offer("control", START_SEQ)
        await settle()
        session.events.put_nowait(ReplyStarted(1))
        session.playout.put(1, bytes(16000 * 2))  # 1 s at 16 kHz
        assert session.playout.after_audio(1, ReplyDone(1, "ok"))
        await asyncio.sleep(0.3)
        early = len(wire.audio())
        assert wire.events()[-1] == {"type": "reply.started", "turn_id": 1}
        await asyncio.sleep(1.2)
        chunks = [unpack_frame(p) for p in wire.audio()]
        assert [seq for seq, _ in chunks] == list(range(len(chunks)))
        assert sum(len(c) for _, c in chunks) == 16000 * 2
        assert early < len(chunks)  # paced in real time, not all at once
        # reply.done leaves with the reply's last audio
        assert [k for k, _, _ in wire.sent][-2:] == ["audio/out", "events"]
        assert wire.events()[-1] == {"type": "reply.done", "turn_id": 1, "text": "ok"}


async def test_session_end_expiry_and_a_dying_session_end_the_adapter() -> None:
    async with device() as (adapter, session, _):
        adapter.offer("control", b'{"type": "session.end"}')
        await settle()
        assert session.closed and adapter.ended and adapter.outcome == "ended"
        assert not adapter.offer("audio/in", bytes(640))
    async with device() as (adapter, session, wire):
        adapter.expire(300)
        await settle()
        assert session.closed and wire.events()[-1]["code"] == "expired"
        assert wire.events()[-1]["fatal"] is True and adapter.outcome == "expired"
    async with device() as (adapter, session, _):
        session.events.close()  # the session ended on its own: the conversation may go on
        await settle()
        assert adapter.ended and adapter.outcome is None


async def test_a_conversation_carried_from_another_node_is_restored_once() -> None:
    restored: list[str] = []

    def restore() -> bool:  # as Session.add_message does, it starts the conversation
        restored.append(session.session_id)
        session.started = True
        return True

    async with device(restore) as (adapter, session, wire):
        adapter.offer("control", b'{"type": "session.start", "audio": {"sample_rate": 7000}}')
        adapter.offer("control", START)
        adapter.offer("control", START)  # a repeat resumes, and restores nothing again
        await settle()
        assert wire.errors() == ["unsupported"]  # a refused start restores nothing
        assert [e["resumed"] for e in wire.events() if e["type"] == "session.ready"] == [
            True, True]
        assert restored == ["s1"]
    async with device(lambda: False) as (adapter, _, wire):  # nothing was carried
        adapter.offer("control", START)
        await settle()
        assert wire.events()[-1]["resumed"] is False


async def test_a_device_another_node_took_over_hears_nothing_more_from_here() -> None:
    async with device() as (adapter, session, wire):
        adapter.offer("control", START)
        await settle()
        sent = len(wire.sent)
        adapter.leave()
        adapter.expire(300)  # anything it would still say goes nowhere
        await settle()
        assert session.closed and adapter.ended and len(wire.sent) == sent
        assert not adapter.offer("control", START)


async def test_last_active_follows_traffic_both_ways() -> None:
    loop = asyncio.get_running_loop()
    async with device() as (adapter, session, _):
        await asyncio.sleep(10)
        adapter.offer("control", START)
        assert adapter.last_active == pytest.approx(loop.time())
        await asyncio.sleep(10)
        session.events.put_nowait(ReplyStarted(1))
        await settle()
        assert adapter.last_active > loop.time() - 1
