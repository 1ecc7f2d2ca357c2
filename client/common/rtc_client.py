"""A Python WebRTC client (aiortc): a WAV file as the microphone, an image or video file as
the camera, reply audio recorded (used by `voxlens talk --transport webrtc`, tests, bench)."""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import numpy.typing as npt
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamTrack, VideoStreamTrack

from client.common import access
from client.common.eventlog import EventLog
from client.common.events import JsonEvent
from client.common.playback import PlaybackReporter
from client.common.reconnect import refusal
from client.common.wavio import last_voiced_sample
from streaming.audio import Float32Array, float_to_pcm16, resample
from streaming.channels import Channel, Full
from streaming.webrtc import EVENTS_LABEL, PcmTrack, mono_pcm, restrict_host_candidates

RATE = 48_000
SILENT_PEAK = 64  # a received frame quieter than this (of 32768) counts as silence


class MicrophoneTrack(PcmTrack):
    """Plays queued utterances in real time (20 ms frames at 48 kHz), silence in between."""

    def __init__(self) -> None:
        super().__init__()
        self._voiced_end: int | None = None  # bytes left until the current utterance's voice ends
        self.voiced_sent_at: float | None = None  # when that sample went out (monotonic)
        self._drained = asyncio.Event()
        self._drained.set()

    def say(self, audio: Float32Array, rate: int, trailing_silence_ms: int = 1200) -> None:
        """Queue an utterance (then silence); ``voiced_sent_at`` is set when its voice ends."""
        x = resample(audio, rate, RATE)
        self._voiced_end = len(self._buf) + 2 * last_voiced_sample(x, RATE)
        self.voiced_sent_at = None
        self._buf.extend(float_to_pcm16(x))
        self._buf.extend(bytes(2 * RATE * trailing_silence_ms // 1000))
        self._drained.clear()

    async def drained(self) -> None:
        await self._drained.wait()

    def view(self) -> TrackView:
        """This microphone for one more peer connection (see TrackView); its real-time pacing
        starts afresh, so what waited while no connection read it is not sent in a burst."""
        self._start = None
        self._pts = 0
        return TrackView(self)

    def _take(self, n: int) -> bytes:
        chunk = super()._take(n)
        if self._voiced_end is not None:
            self._voiced_end -= len(chunk)
            if self._voiced_end <= 0:
                self.voiced_sent_at = time.monotonic()
                self._voiced_end = None
        if not self._buf:
            self._drained.set()
        return chunk


class TrackView(MediaStreamTrack):
    """One peer connection's view of a track that outlives it. aiortc stops the track of a
    sender whose connection closes: this view is what it stops, so the track itself (a
    microphone, a camera, a file played in a loop) goes on into the next connection. Its
    owner stops it."""

    def __init__(self, track: MediaStreamTrack) -> None:
        super().__init__()
        self.kind = track.kind
        self.track = track

    async def recv(self) -> av.frame.Frame | av.packet.Packet[Any]:
        return await self.track.recv()


def load_image(path: str | Path) -> npt.NDArray[np.uint8]:
    """An image file as an RGB array (decoded by FFmpeg through av)."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)


class ImageTrack(VideoStreamTrack):
    """A still image (a file, or an RGB array) as a camera, at ``fps`` frames per second."""

    def __init__(self, image: str | Path | npt.NDArray[np.uint8], fps: int = 10) -> None:
        super().__init__()
        self.show(image)
        self._fps = fps
        self._ticks = 0
        self._t0: float | None = None

    def show(self, image: str | Path | npt.NDArray[np.uint8]) -> None:
        """Point the camera at another image."""
        self._image = image if isinstance(image, np.ndarray) else load_image(image)

    async def recv(self) -> av.VideoFrame:
        if self._t0 is None:
            self._t0 = time.monotonic()
        else:
            self._ticks += 1
            delay = self._t0 + self._ticks / self._fps - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        frame = av.VideoFrame.from_ndarray(self._image, format="rgb24")
        frame.pts = self._ticks * 90_000 // self._fps
        frame.time_base = fractions.Fraction(1, 90_000)
        return frame


def camera_track(path: str | Path) -> MediaStreamTrack:
    """An image file as a still camera, or a video file played in a loop."""
    if Path(path).suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"):
        return ImageTrack(path)
    player = MediaPlayer(str(path), loop=True)
    assert player.video is not None, f"{path} has no video stream"
    return player.video


class WebRtcClient(EventLog):
    """One WebRTC session against ``POST {base_url}/offer`` (with ``api_key``: with a token
    minted for it, client/common/access.py). Its microphone goes out through a view (TrackView),
    so a client made for the next session can take it over.

    Entering it waits for the session to be ready. A refused offer raises Refused (``busy``,
    ``draining``, ``not_ready`` …, or ``unavailable`` from a balancer with no node), a refused
    credential AccessError, and any other failure to connect a ConnectionError or
    TimeoutError."""

    def __init__(self, base_url: str, *, camera: MediaStreamTrack | None = None,
                 language: str | None = None, host_addresses: list[str] | None = None,
                 on_event: Callable[[JsonEvent], None] | None = None,
                 echo_cancellation: bool = True, report_playback: bool = True,
                 api_key: str | None = None) -> None:
        super().__init__(on_event)
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.echo_cancellation = echo_cancellation  # False: the server removes the echo
        self.report_playback = report_playback
        self.microphone = MicrophoneTrack()
        self.camera = camera
        self.language = language
        self.session_id: str | None = None
        if host_addresses:
            restrict_host_candidates(host_addresses)
        self.pc = RTCPeerConnection()  # no ICE servers: host candidates only
        self._channel: RTCDataChannel | None = None
        # data channel → events; None: the connection ended (after the events before it)
        self._inbox: Channel[str | None] = Channel(1024, Full.DROP_OLDEST)
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> WebRtcClient:
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise
        return self

    async def _open(self) -> None:
        pc = self.pc
        self._channel = pc.createDataChannel(EVENTS_LABEL)
        self._channel.on("message", self._on_message)
        self._tasks.append(asyncio.create_task(self._read_events()))
        if self.report_playback:
            reporter = PlaybackReporter(self.playing, self._send_report)
            self._tasks.append(asyncio.create_task(reporter.run()))
        pc.addTrack(self.microphone.view())
        if self.camera is not None:
            pc.addTrack(self.camera)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._tasks.append(asyncio.create_task(self._record(track)))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._inbox.put_nowait(None)  # the last word (session.closing) is read first

        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                "language": self.language, "echo_cancellation": self.echo_cancellation}

        async def offer(headers: dict[str, str]) -> dict[str, Any]:
            async with http.post(f"{self.base_url}/offer", json=body, headers=headers) as resp:
                if resp.status == 401:
                    raise access.Unauthorized
                try:
                    answer = await resp.json(content_type=None)
                except ValueError:  # not JSON: a balancer's own error page
                    answer = None
                if not isinstance(answer, dict):
                    answer = {}
                if resp.status != 200:
                    raise refusal(resp.status, answer, resp.headers.get("Retry-After"))
                return answer
        async with aiohttp.ClientSession() as http:
            try:
                answer = await access.authorized(http, self.base_url, self.api_key, offer)
            except aiohttp.ClientError as e:
                raise ConnectionError(f"POST /offer: {e or type(e).__name__}") from e
        self.session_id = answer["session_id"]
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        await self.wait_for(lambda: self.ready is not None, timeout_s=30)

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()
        await self.mark_closed()

    def _on_message(self, raw: str | bytes) -> None:
        if isinstance(raw, str):
            self._inbox.put_nowait(raw)

    async def _read_events(self) -> None:
        async for raw in self._inbox:
            if raw is None:
                await self.mark_closed()
            else:
                await self.add_event(json.loads(raw))

    async def _record(self, track: MediaStreamTrack) -> None:
        """Reply audio as 48 kHz mono s16le; silence before a turn's first audio is skipped."""
        async for pcm in mono_pcm(track, RATE):
            turn = self.turns.get(self._current) if self._current is not None else None
            silent = np.abs(pcm).max() < SILENT_PEAK
            if turn is None or (not turn.audio and silent):
                continue
            await self.add_audio(pcm.astype("<i2").tobytes())
            if not silent:
                turn.voiced = len(turn.audio)

    def played_ms(self, turn_id: int) -> float:
        """A WebRTC track plays as it arrives: the turn's audio up to its latest sound."""
        turn = self.turns[turn_id]
        if turn.played_when_cut is not None:
            return turn.played_when_cut
        return turn.voiced / 2 * 1000 / RATE

    async def _send_report(self, report: JsonEvent) -> None:
        self.send(report)

    def interrupt(self) -> None:
        self.send({"type": "interrupt"})

    def send(self, message: dict[str, Any]) -> None:
        """Send on the events channel; ConnectionError when it is not open (or no longer)."""
        if self._channel is None or self._channel.readyState != "open":
            raise ConnectionError("the events channel is not open")
        self._channel.send(json.dumps(message))

    def say_text(self, text: str) -> None:
        self.send({"type": "text", "text": text})

    async def speak(self, audio: Float32Array, rate: int) -> float:
        """Speak an utterance into the microphone; returns when its voice was sent."""
        self.microphone.say(audio, rate)
        await self.microphone.drained()
        assert self.microphone.voiced_sent_at is not None
        return self.microphone.voiced_sent_at
