"""The WebRTC transport adapter: aiortc tracks and the "events" data channel ⇄ a session.

Audio in: decoded frames (48 kHz, often stereo) → av's resampler (which reads
the frame's channel layout) → 16 kHz mono. Audio out: ``ReplyTrack`` paces
reply audio in real time in 20 ms frames and sends silence when idle; it
always knows how much reply audio it has sent. Video in: read continuously,
only the newest frame is kept. The data channel labelled "events" carries the
WebSocket protocol's JSON events (server → peer) and client messages.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fractions
import logging
import time
from collections.abc import AsyncIterator, Iterable

import aioice.ice
import av
import numpy as np
import numpy.typing as npt
from aiortc import RTCDataChannel, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streaming.channels import ChannelClosed
from streaming.errors import ProtocolError, VoxlensError
from streaming.events import Error, Event
from streaming.images import KEEP_SIDE
from streaming.microphone import Microphone
from streaming.playout import Playout
from streaming.ports import SessionPort, apply_client_message
from streaming.protocol import (
    ImageFrame,
    SessionEnd,
    SessionStart,
    encode_event,
    parse_client_message,
)
from streaming.ratelimit import MessageLimits

log = logging.getLogger(__name__)

OUT_RATE = 48_000  # Opus's clock; the session synthesizes straight at this rate
FRAME_MS = 20
FRAME_SAMPLES = OUT_RATE * FRAME_MS // 1000
EVENTS_LABEL = "events"
PENDING_EVENTS = 256  # events kept while the data channel is not open yet
FRAME_EVERY_S = 0.25  # camera frames handed to the session at most this often


async def mono_pcm(track: MediaStreamTrack, rate: int) -> AsyncIterator[npt.NDArray[np.int16]]:
    """An audio track's frames as mono s16 at ``rate`` until the track ends. av's resampler
    reads each frame's channel layout, so stereo is averaged, never mislabelled."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()
            assert isinstance(frame, av.AudioFrame)
            for out in resampler.resample(frame):
                yield np.asarray(out.to_ndarray(), dtype=np.int16).reshape(-1)


def restrict_host_candidates(addresses: Iterable[str]) -> None:
    """Offer ICE host candidates on these addresses only (process-wide).

    aioice offers every interface but loopback; a server pinned to one address,
    and the tests (which must stay on 127.0.0.1), set this.
    """
    fixed = list(addresses)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in fixed if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = host_addresses


class PcmTrack(MediaStreamTrack):
    """An outgoing audio track fed with s16le mono PCM at 48 kHz, paced in real time in 20 ms
    frames by its own clock, silence when nothing is queued. Subclasses may take each
    frame's payload from elsewhere (``_take``)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._buf = bytearray()
        self._start: float | None = None
        self._pts = 0

    def _take(self, n: int) -> bytes:
        """The next frame's payload (at most ``n`` bytes; silence pads the rest)."""
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += FRAME_SAMPLES
            delay = self._start + self._pts / OUT_RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        n = FRAME_SAMPLES * 2
        chunk = self._take(n)
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(chunk.ljust(n, b"\0"))
        frame.sample_rate = OUT_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, OUT_RATE)
        return frame


class ReplyTrack(PcmTrack):
    """Reply audio out: each 20 ms tick takes its frame from the session's ``Playout``."""

    def __init__(self, playout: Playout) -> None:
        super().__init__()
        self.playout = playout

    def _take(self, n: int) -> bytes:
        return self.playout.take(n)


class WebRtcAdapter:
    """Connects one RTCPeerConnection to one session. Create it before
    ``setRemoteDescription`` (and after the session is configured for ``OUT_RATE``) so it
    sees the peer's tracks and data channel."""

    def __init__(self, pc: RTCPeerConnection, session: SessionPort, *,
                 client_aec: bool = True, limits: MessageLimits | None = None) -> None:
        self.pc = pc
        self.session = session
        self.limits = limits or MessageLimits()  # typed turns per second
        self.microphone = Microphone(session, cancel_echo=not client_aec)
        self.reply = ReplyTrack(session.playout)
        self.latest_frame: av.VideoFrame | None = None
        self.frames_received = 0
        self.remote_tracks: list[MediaStreamTrack] = []
        self._channel: RTCDataChannel | None = None
        self._pending: collections.deque[str] = collections.deque(maxlen=PENDING_EVENTS)
        self._done = asyncio.Event()
        pc.on("track", self.remote_tracks.append)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)

    def _on_state(self) -> None:
        log.info("peer %s: %s", self.session.session_id, self.pc.connectionState)
        if self.pc.connectionState in ("failed", "closed", "disconnected"):
            self._done.set()

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != EVENTS_LABEL:
            return
        self._channel = channel
        channel.on("message", self._on_message)
        if channel.readyState == "open":
            self._flush()
        else:
            channel.on("open", self._flush)

    def _flush(self) -> None:
        while self._pending and self._channel is not None:
            self._channel.send(self._pending.popleft())

    def _send(self, event: Event) -> None:
        wire = encode_event(event)
        if self._channel is not None and self._channel.readyState == "open":
            self._channel.send(wire)
        else:
            self._pending.append(wire)

    def _on_message(self, raw: str | bytes) -> None:
        try:
            if isinstance(raw, bytes):
                raise ProtocolError("the events channel takes JSON text only")
            message = parse_client_message(raw)
            self.limits.check(message)
            match apply_client_message(message, self.session):
                case SessionStart():
                    raise ProtocolError("over WebRTC, send language and instructions with the "
                                        "offer; media formats are negotiated by WebRTC",
                                        code="unsupported")
                case ImageFrame():
                    raise ProtocolError("over WebRTC the camera is a video track",
                                        code="unsupported")
                case SessionEnd():
                    self._done.set()
        except VoxlensError as e:
            self._send(Error(e.code, e.message, not e.recoverable, e.retry_after))
        except ChannelClosed:  # the session ended (session.end just before, or the server
            pass  # ended it) while the peer's messages were still arriving: they are moot
        except Exception:  # a bug: raised into aiortc it would leave the channel deaf, silently
            log.exception("session %s: a data channel message failed", self.session.session_id)
            self._send(Error("internal", "the session failed and was closed", True))
            self._done.set()

    async def run(self) -> None:
        """Pump media and events until the peer leaves, the session ends, or the peer sends
        ``session.end``. Cancelling it stops the pumps; either way the session is closed,
        the tracks stopped and the peer connection closed."""
        self._send(self.session.ready_event())
        try:
            async with asyncio.TaskGroup() as tg:
                pumps = [tg.create_task(self._pump_events())]
                for track in self.remote_tracks:
                    pump = self._audio_in(track) if track.kind == "audio" else self._video_in(track)
                    pumps.append(tg.create_task(pump))
                await self._done.wait()
                for task in pumps:
                    task.cancel()
        finally:
            self.session.close()
            self.reply.stop()
            for track in self.remote_tracks:
                track.stop()
            await self.pc.close()

    async def _pump_events(self) -> None:
        async for event in self.session.events:
            self._send(event)
        self._done.set()  # the session ended on its own

    async def _audio_in(self, track: MediaStreamTrack) -> None:
        async for pcm in mono_pcm(track, 16_000):
            try:
                await self.microphone.push_samples(pcm.astype(np.float32) / 32768.0)
            except ChannelClosed:  # the session ended under it (the server closed it)
                return

    async def _video_in(self, track: MediaStreamTrack) -> None:
        """Read every frame (so aiortc's queue never grows), keep only the newest, and hand
        the session a downscaled RGB copy at most every ``FRAME_EVERY_S``."""
        handed = 0.0
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, av.VideoFrame)
                self.latest_frame = frame
                self.frames_received += 1
                now = time.monotonic()
                if now - handed >= FRAME_EVERY_S:
                    handed = now
                    scale = min(1.0, KEEP_SIDE / max(frame.width, frame.height))
                    small = frame.reformat(width=round(frame.width * scale) // 2 * 2,
                                           height=round(frame.height * scale) // 2 * 2,
                                           format="rgb24")
                    with contextlib.suppress(ProtocolError):  # vision off: frames unused
                        self.session.push_frame(np.asarray(small.to_ndarray(), np.uint8))
