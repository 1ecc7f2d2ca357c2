"""A small WebSocket client for voxlens (used by `voxlens talk`, the tests and bench)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np

from client.events import EventLog
from client.wavio import last_voiced_sample
from streaming.audio import Float32Array, float_to_pcm16, resample

FRAME_MS = 20


class VoxlensClient(EventLog):
    """One WebSocket session. Events are collected as they arrive by a reader task."""

    def __init__(self, url: str, *, on_event: Callable[[dict[str, Any]], None] | None = None):
        super().__init__(on_event)
        self.url = url
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> VoxlensClient:
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(self.url, max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.wait_for(lambda: self.ready is not None, timeout_s=30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    await self.add_audio(msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    await self.add_event(json.loads(msg.data))
                else:
                    break
        finally:
            await self.mark_closed()

    async def send(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send_str(json.dumps(message))

    async def send_raw(self, data: str | bytes) -> None:
        assert self._ws is not None
        if isinstance(data, bytes):
            await self._ws.send_bytes(data)
        else:
            await self._ws.send_str(data)

    async def start(self, **fields: Any) -> None:
        """Send ``session.start`` and wait for the new ``session.ready`` (or an error)."""
        before = sum(e.get("type") == "session.ready" for e in self.events)
        await self.send({"type": "session.start", **fields})
        await self.wait_for(
            lambda: sum(e.get("type") == "session.ready" for e in self.events) > before
            or bool(self.errors))

    async def say(self, text: str) -> None:
        await self.send({"type": "text", "text": text})

    async def stream_audio(self, audio: Float32Array, rate: int, *, realtime: bool = True,
                           trailing_silence_ms: int = 1200) -> float:
        """Send mono audio as 16 kHz PCM in 20 ms messages, paced in real time, then silence.

        Returns the client clock time at which the last voiced sample was sent.
        """
        x = resample(audio, rate, 16_000)
        end_voiced = last_voiced_sample(x, 16_000)
        x = np.concatenate([x, np.zeros(16 * trailing_silence_ms, dtype=np.float32)])
        step = 16 * FRAME_MS
        start = time.monotonic()
        voiced_sent_at = start
        for k, i in enumerate(range(0, x.size, step)):
            if realtime:
                delay = start + k * FRAME_MS / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await self.send_raw(float_to_pcm16(x[i:i + step]))
            if i < end_voiced <= i + step:
                voiced_sent_at = time.monotonic()
        return voiced_sent_at
