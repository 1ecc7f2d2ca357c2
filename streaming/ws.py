"""The WebSocket transport adapter: aiohttp messages ⇄ a session (docs/PROTOCOL.md)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType, web

from streaming.errors import ProtocolError, VoxlensError
from streaming.events import Error, Event
from streaming.images import decode_base64_image
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
    encode_event,
    parse_client_message,
)
from streaming.ratelimit import MessageLimits, RateLimited

log = logging.getLogger(__name__)
MAX_BAD_MESSAGES = 20  # a client that keeps sending garbage is disconnected
CHUNK_MS = 40  # reply audio message length
LEAD_MS = 200  # reply audio sent ahead of real time (the client's playout buffer feeds on it)


class WebSocketAdapter:
    def __init__(self, ws: web.WebSocketResponse, session: SessionPort, *,
                 lead_ms: int = LEAD_MS, limits: MessageLimits | None = None) -> None:
        self.ws = ws
        self.session = session
        self.limits = limits or MessageLimits()  # typed turns and images per second
        self.lead_ms = lead_ms
        self.audio = ClientAudio(session)
        self._bad = 0
        self._send_lock = asyncio.Lock()  # the pumps and replies to bad input share the socket

    async def run(self) -> None:
        """Pump both directions until the client leaves or ends the session.

        Cancelling it stops both pumps; the caller closes the session.
        """
        await self._send(self.session.ready_event())
        await pump(self.session, self._receive, send_event=self._send,
                   send_audio=self._send_audio, hang_up=self._hang_up, chunk_ms=CHUNK_MS,
                   lead_ms=self.lead_ms)

    async def _send(self, event: Event) -> None:
        wire = encode_event(event)
        async with self._send_lock:
            await self.ws.send_str(wire)

    async def _hang_up(self) -> None:
        await self.ws.close()

    async def _send_audio(self, chunk: bytes) -> None:
        async with self._send_lock:
            await self.ws.send_bytes(chunk)

    async def _receive(self) -> None:
        async for msg in self.ws:
            try:
                if msg.type == WSMsgType.TEXT:
                    if not await self._on_text(msg.data):
                        return
                elif msg.type == WSMsgType.BINARY:
                    await self._on_audio(msg.data)
                elif msg.type == WSMsgType.ERROR:
                    log.info("websocket error: %s", self.ws.exception())
                    return
            except VoxlensError as e:
                await self._reject(e)
                if self._bad > MAX_BAD_MESSAGES:
                    await self.ws.close(code=1008, message=b"too many bad messages")
                    return

    async def _reject(self, e: VoxlensError) -> None:
        if not isinstance(e, RateLimited):  # a fast client is not a broken one
            self._bad += 1
        await self._send(Error(e.code, e.message, not e.recoverable, e.retry_after))

    async def _on_audio(self, data: bytes) -> None:
        check_audio_message(data)
        await self.audio.push(data)

    async def _on_text(self, raw: str) -> bool:
        """Handle one client message; False when the client ended the session."""
        message = parse_client_message(raw)
        self.limits.check(message)
        match apply_client_message(message, self.session):
            case SessionStart() as m:
                if m.audio.sequence or m.output_audio.sequence:
                    raise ProtocolError("sequence-numbered audio is for MQTT; a WebSocket "
                                        "delivers messages in order", code="unsupported")
                self.audio.start(m, resumable=False)
                await self._send(self.session.ready_event())
            case ImageFrame(data=data):
                # decoding a large JPEG takes milliseconds: off the event loop
                self.session.push_frame(await asyncio.to_thread(decode_base64_image, data))
            case SessionEnd():
                return False
        return True
