"""The WebRTC adapter between two real in-process aiortc peers on loopback, with a fake session."""

from __future__ import annotations

import asyncio
import fractions

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack

from client.common.rtc_client import ImageTrack
from streaming.audio import Float32Array
from streaming.channels import Channel
from streaming.events import AudioFormat, Event, ReplyStarted, SessionReady
from streaming.microphone import EchoMeter
from streaming.playout import Playout
from streaming.webrtc import EVENTS_LABEL, WebRtcAdapter, restrict_host_candidates
from tests.conftest import until

restrict_host_candidates(["127.0.0.1"])


class FakeSession:
    session_id = "fake"

    def __init__(self) -> None:
        self.events: Channel[Event] = Channel(64)
        self.audio: list[Float32Array] = []
        self.frames: list[np.ndarray] = []
        self.closed = False
        self.playout = Playout(48000, release=self.events.put_nowait)
        self.echo: EchoMeter | None = None

    def ready_event(self) -> SessionReady:
        return SessionReady("fake", AudioFormat(16000), AudioFormat(48000), {})

    def configure(self, **_: object) -> None: ...

    def attach_echo(self, meter: EchoMeter | None) -> None:
        self.echo = meter

    def interrupt(self) -> None: ...

    def playback(self, played_ms: int, turn_id: int | None) -> None: ...

    async def push_audio(self, audio: Float32Array) -> None:
        self.audio.append(audio)

    def submit_text(self, text: str) -> None: ...

    def push_frame(self, image: np.ndarray) -> None:
        self.frames = [image]  # what a session does: keep the newest only

    def close(self) -> None:
        self.closed = True
        self.events.close()


class StereoTone(MediaStreamTrack):
    """48 kHz stereo 440 Hz in both channels, 20 ms frames, paced."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.pts = 0

    async def recv(self) -> av.AudioFrame:
        await asyncio.sleep(0.02)
        t = (self.pts + np.arange(960)) / 48000
        tone = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
        frame = av.AudioFrame.from_ndarray(np.stack([tone, tone], 1).reshape(1, -1),
                                           format="s16", layout="stereo")
        frame.sample_rate = 48000
        frame.pts = self.pts
        frame.time_base = fractions.Fraction(1, 48000)
        self.pts += 960
        return frame


async def connect(camera: bool = True):  # type: ignore[no-untyped-def]
    session = FakeSession()
    server_pc, client_pc = RTCPeerConnection(), RTCPeerConnection()
    adapter = WebRtcAdapter(server_pc, session)
    client_pc.createDataChannel(EVENTS_LABEL)
    client_pc.addTrack(StereoTone())
    if camera:
        client_pc.addTrack(ImageTrack(np.full((120, 160, 3), 90, np.uint8), fps=30))
    received: list[MediaStreamTrack] = []
    client_pc.on("track", received.append)
    await client_pc.setLocalDescription(await client_pc.createOffer())
    await server_pc.setRemoteDescription(client_pc.localDescription)
    server_pc.addTrack(adapter.reply)
    await server_pc.setLocalDescription(await server_pc.createAnswer())
    await client_pc.setRemoteDescription(server_pc.localDescription)
    return adapter, session, client_pc, received


async def test_stereo_48k_becomes_16k_mono_at_the_right_pitch() -> None:
    adapter, session, client_pc, _ = await connect(camera=False)
    runner = asyncio.create_task(adapter.run())
    await until(lambda: sum(a.size for a in session.audio) >= 16000 * 2)
    await client_pc.close()
    await asyncio.wait_for(runner, 5)
    x = np.concatenate(session.audio)[8000:]  # skip the codec's start
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    peak_hz = np.argmax(spectrum) * 16000 / x.size
    assert abs(peak_hz - 440) < 5, peak_hz  # not sped up or slowed down
    assert 0.3 < np.sqrt(2) * x.std() < 0.7  # both channels averaged, not summed or halved
    assert session.closed and adapter.reply.readyState == "ended"


async def test_video_keeps_only_the_newest_frame_and_reply_audio_is_paced() -> None:
    adapter, session, client_pc, received = await connect()
    runner = asyncio.create_task(adapter.run())
    await session.events.put(ReplyStarted(1))
    second = np.full(48000, 1000, "<i2").tobytes()  # 1 s of reply audio
    session.playout.put(1, second)
    await until(lambda: adapter.frames_received >= 20)
    video = next(t for t in adapter.remote_tracks if t.kind == "video")
    assert video._queue.qsize() <= 2  # read continuously: aiortc's queue never grows
    assert adapter.latest_frame is not None and adapter.latest_frame.width == 160
    assert session.frames[0].shape == (120, 160, 3) and session.frames[0].dtype == np.uint8
    # the reply track has sent the whole second of reply audio, and then silence
    await until(lambda: session.playout.sent_ms(1) >= 1000)
    assert session.playout.sent_ms(1) == pytest.approx(1000)
    assert session.playout.queued_ms() == 0
    assert [t.kind for t in received] == ["audio"]
    await client_pc.close()
    await asyncio.wait_for(runner, 5)
    assert session.closed
