"""The MQTT transport adapter for one device: its control and audio messages ⇄ its session.

The server's bridge (server/mqtt.py) owns the one broker connection. It hands each device's
messages to that device's ``DeviceAdapter`` without waiting (``offer``: a bounded inbox per
device), and the adapter publishes through a ``send`` callback that never waits either. So a
slow, flooding or broken device only ever hurts itself. The session outlives the device's
connection: a repeated ``session.start`` with the same audio format resumes it. With several
nodes on one broker, a device's conversation can come from the node that served it before
(``restore``), and the adapter can leave silently when another node takes the device over.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from streaming.channels import ChannelClosed
from streaming.errors import ProtocolError, VoxlensError
from streaming.events import Error, Event
from streaming.images import decode_base64_image
from streaming.mqtt import (
    AUDIO_IN,
    AUDIO_OUT,
    CONTROL,
    EVENTS,
    QOS,
    SEQ_MOD,
    Kind,
    Reorderer,
    pack_frame,
    unpack_frame,
)
from streaming.ports import (
    ClientAudio,
    SessionPort,
    apply_client_message,
    check_audio_message,
    pump,
)
from streaming.protocol import (
    ImageFrame,
    SessionEnd,
    SessionStart,
    event_to_json,
    parse_client_message,
)
from streaming.ratelimit import TokenBucket

log = logging.getLogger(__name__)

Send = Callable[[Kind, bytes, int], None]  # (topic kind, payload, QoS); must not wait
Restore = Callable[[], bool]  # puts a carried conversation into a new session; True if it did
Outcome = Literal["ended", "expired"]  # the device ended its session, or it went quiet

CHUNK_MS = 40  # reply audio message length
LEAD_MS = 200  # reply audio sent ahead of real time (the device's jitter buffer feeds on it)
INBOX = {CONTROL: 16, AUDIO_IN: 50}  # unread messages per kind (50 audio messages: 1–5 s)
REORDER_WINDOW = 8  # sequence-numbered audio: frames held waiting for a missing one
FLUSH_AFTER_S = 0.25  # held frames are given up on when no audio came for this long
ERROR_BURST, ERROR_RATE = 10, 2.0  # error events per device: a burst, then this many a second


class Inbox:
    """A device's unread messages in arrival order, with a bound per kind: an audio flood
    cannot push out control messages, and nothing grows without limit."""

    def __init__(self, limits: dict[str, int]) -> None:
        self._limits = limits
        self._items: collections.deque[tuple[str, bytes]] = collections.deque()
        self._counts = dict.fromkeys(limits, 0)
        self.dropped = dict.fromkeys(limits, 0)
        self._readable = asyncio.Event()
        self._closed = False

    def offer(self, kind: str, payload: bytes) -> bool:
        """Queue without waiting; False (and counted) when that kind is full or closed."""
        if self._closed or kind not in self._limits:
            return False
        if self._counts[kind] >= self._limits[kind]:
            self.dropped[kind] += 1
            return False
        self._items.append((kind, payload))
        self._counts[kind] += 1
        self._readable.set()
        return True

    async def get(self) -> tuple[str, bytes]:
        """The oldest message; ChannelClosed once closed. Cancelling it takes nothing."""
        while not self._items:
            if self._closed:
                raise ChannelClosed("inbox is closed")
            self._readable.clear()
            await self._readable.wait()
        kind, payload = self._items.popleft()
        self._counts[kind] -= 1
        return kind, payload

    def close(self) -> None:
        self._closed = True
        self._items.clear()
        self._counts = dict.fromkeys(self._limits, 0)
        self._readable.set()


class ErrorBudget:
    """A token bucket for error events, so garbage sent in a loop is not echoed in a loop."""

    def __init__(self, burst: int = ERROR_BURST, rate: float = ERROR_RATE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._bucket = TokenBucket(rate, burst, clock=clock)
        self.suppressed = 0

    def take(self) -> bool:
        if self._bucket.take():
            return True
        self.suppressed += 1
        return False


class DeviceAdapter:
    """One device's session on this node: its inbox, reorder buffer, error budget and reply
    audio. ``restore`` (several nodes) is called once, at the first ``session.start`` that
    starts the session, to put the conversation the device had on another node into it."""

    def __init__(self, device_id: str, session: SessionPort, send: Send, *,
                 lead_ms: int = LEAD_MS, clock: Callable[[], float] = time.monotonic,
                 restore: Restore | None = None) -> None:
        self.device_id = device_id
        self.session = session
        self.lead_ms = lead_ms
        self._send = send
        self._clock = clock
        self.audio = ClientAudio(session, clock=clock)
        self._inbox = Inbox(INBOX)
        self._reported = dict.fromkeys(INBOX, 0)  # inbox drops already reported
        self._errors = ErrorBudget(clock=clock)
        self._in_order: Reorderer[bytes] | None = None  # when the device numbers its audio
        self._out_seq: int | None = None  # next audio/out sequence number, when asked for
        self.ended = False  # session.end received or the session is gone: offer() refuses
        self.outcome: Outcome | None = None  # how the conversation ended, when it did for good
        self.last_active = clock()
        self._restore = restore

    # ---- the bridge's side ----------------------------------------------------------

    def offer(self, kind: Kind, payload: bytes) -> bool:
        """A message from the device (control or audio/in); never waits. False when dropped."""
        self.last_active = self._clock()
        return not self.ended and self._inbox.offer(kind, payload)

    def expire(self, idle_s: float) -> None:
        """Close the session of a device that went quiet, telling it why."""
        self._emit(Error("expired", f"the session was closed after {idle_s:g} s without "
                         "traffic; send session.start to begin a new one", True))
        self.ended = True
        self.outcome = "expired"
        self.session.close()

    def leave(self) -> None:
        """Another node serves the device now: end the session here and send it nothing more."""
        self._send = _nowhere
        self.ended = True
        self._inbox.close()
        self.session.close()

    async def run(self) -> None:
        """Pump the device's messages into the session and its events and reply audio out,
        until the session ends (``session.end``, expiry, a fatal error).

        Cancelling it stops every pump; either way the session is closed on the way out.
        """
        try:
            await pump(self.session, self._receive, send_event=self._send_event,
                       send_audio=self._send_audio, hang_up=self._hang_up, chunk_ms=CHUNK_MS,
                       lead_ms=self.lead_ms)
        finally:
            self.ended = True

    # ---- device → session -----------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            try:
                kind, payload = await self._next_message()
            except ChannelClosed:
                return
            except TimeoutError:  # numbered audio stopped with a gap: play what is held
                assert self._in_order is not None
                await self._push_frames(self._in_order.flush())
                continue
            try:
                if kind == CONTROL:
                    if not await self._on_control(payload):
                        self.outcome = "ended"
                        return
                else:
                    await self._on_audio(payload)
            except VoxlensError as e:
                self._reject(e)
            self._report_drops()

    async def _next_message(self) -> tuple[str, bytes]:
        if self._in_order is not None and self._in_order.pending:
            async with asyncio.timeout(FLUSH_AFTER_S):  # (wait_for may swallow a cancel on 3.11)
                return await self._inbox.get()
        return await self._inbox.get()

    def _reject(self, e: VoxlensError) -> None:
        if self._errors.take():
            self._emit(Error(e.code, e.message, not e.recoverable))

    def _report_drops(self) -> None:
        for kind, n in self._inbox.dropped.items():
            if n > self._reported[kind] and self._errors.take():
                self._emit(Error("busy", f"{n - self._reported[kind]} {kind} messages dropped: "
                                 "the device sends faster than the session can take them"))
                self._reported[kind] = n

    async def _on_audio(self, payload: bytes) -> None:
        check_audio_message(payload)
        if self._in_order is None:
            await self.audio.push(payload)
            return
        seq, pcm = unpack_frame(payload)
        if len(pcm) % self.audio.converter.frame_bytes:  # refused now, not when it is due
            raise ProtocolError(f"audio of {len(pcm)} bytes after the header is not a whole "
                                f"number of {self.audio.converter.frame_bytes}-byte frames",
                                code="bad_audio")
        await self._push_frames(self._in_order.push(seq, pcm))

    async def _push_frames(self, frames: list[tuple[int, bytes]]) -> None:
        for missing, pcm in frames:
            if missing:  # lost frames become silence of the same length: the clock stays right
                await self.audio.push(bytes(len(pcm) * min(missing, REORDER_WINDOW)))
            await self.audio.push(pcm)

    async def _on_control(self, payload: bytes) -> bool:
        """Handle one client message; False when the device ended the session."""
        try:
            raw = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError("control message is not UTF-8 JSON text") from e
        match apply_client_message(parse_client_message(raw), self.session):
            case SessionStart() as m:
                self._start(m)
            case ImageFrame(data=data):
                # decoding a large JPEG takes milliseconds: off the event loop
                self.session.push_frame(await asyncio.to_thread(decode_base64_image, data))
            case SessionEnd():
                return False
        return True

    def _start(self, m: SessionStart) -> None:
        """Configure the session, or resume it: a device that reconnects repeats its
        ``session.start``, and the same audio format continues the conversation."""
        resumed = self.audio.start(m, resumable=True)
        if self._restore is not None and not resumed:
            resumed = self._restore()  # the conversation goes on from where another node left it
        self._restore = None
        self._in_order = Reorderer(REORDER_WINDOW) if m.audio.sequence else None
        self._out_seq = 0 if m.output_audio.sequence else None
        ready_json = event_to_json(self.session.ready_event())
        ready_json["resumed"] = resumed
        ready_json["input"]["sequence"] = m.audio.sequence
        ready_json["output"]["sequence"] = m.output_audio.sequence
        self._publish_json(ready_json)

    # ---- session → device -----------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self._publish_json(event_to_json(event))

    def _publish_json(self, obj: dict[str, Any]) -> None:
        self.last_active = self._clock()
        self._send(EVENTS, json.dumps(obj, ensure_ascii=False).encode(), QOS[EVENTS])

    async def _send_event(self, event: Event) -> None:
        self._emit(event)

    async def _hang_up(self) -> None:
        """The session ended on its own: stop reading the device."""
        self.ended = True
        self._inbox.close()

    async def _send_audio(self, chunk: bytes) -> None:
        self.last_active = self._clock()
        if self._out_seq is not None:
            chunk = pack_frame(self._out_seq, chunk)
            self._out_seq = (self._out_seq + 1) % SEQ_MOD
        self._send(AUDIO_OUT, chunk, QOS[AUDIO_OUT])


def _nowhere(kind: Kind, payload: bytes, qos: int) -> None:
    """The send of an adapter whose device another node serves now."""
