"""A small WebSocket client for voxlens (used by `voxlens talk`, the tests and bench)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np

from client.common import access
from client.common.eventlog import EventLog
from client.common.events import Error, JsonEvent, decode_event
from client.common.playback import PlaybackReporter
from client.common.reconnect import Refused, refusal
from client.common.wavio import last_voiced_sample
from streaming.audio import Float32Array, float_to_pcm16, resample

FRAME_MS = 20
HEARTBEAT_S = 20  # a ping this often: a server or network gone silent ends the session


class VoxlensClient(EventLog):
    """One WebSocket session. Events are collected as they arrive by a reader task. With
    ``api_key`` it connects with a token minted for the connection (client/common/access.py); with
    ``session_start`` (the fields of a ``session.start``) it configures the session before
    entering it.

    Entering it waits for the session to be ready. A server that refuses the session raises
    Refused (``busy``, ``draining`` …; also a 503 instead of the upgrade, from a node still
    loading or a balancer with no node), one that refuses the credential AccessError, and
    any other failure to connect a ConnectionError or TimeoutError."""

    def __init__(self, url: str, *, on_event: Callable[[JsonEvent], None] | None = None,
                 report_playback: bool = True, api_key: str | None = None,
                 session_start: dict[str, Any] | None = None):
        super().__init__(on_event)
        self.url = url
        self.api_key = api_key
        self.report_playback = report_playback
        self.session_start = session_start
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> VoxlensClient:
        self._http = aiohttp.ClientSession()
        try:
            await self._connect(self._http)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _connect(self, http: aiohttp.ClientSession) -> None:
        try:
            self._ws = await access.ws_connect(http, self.url, self.api_key, max_msg_size=0,
                                               heartbeat=HEARTBEAT_S)
        except aiohttp.WSServerHandshakeError as e:  # answered without the upgrade
            raise refusal(e.status, {}, e.headers.get("Retry-After") if e.headers else None) from e
        except aiohttp.ClientError as e:
            raise ConnectionError(str(e) or type(e).__name__) from e
        self._tasks.append(asyncio.create_task(self._read()))
        if self.report_playback:
            self._tasks.append(asyncio.create_task(PlaybackReporter(self.playing, self.send).run()))
        try:
            await self.wait_for(lambda: self.ready is not None, timeout_s=30)
        except ConnectionError:
            self._raise_refusal()
            raise
        if self.session_start is not None:
            before = len(self.errors)
            await self.start(**self.session_start)
            self._raise_refusal(before)

    def _raise_refusal(self, before: int = 0) -> None:
        """Raise the last error the server sent (after the first ``before``) as a Refused."""
        if len(self.errors) > before:
            match decode_event(self.errors[-1]):
                case Error(code=code, message=message, retry_after=after):
                    raise Refused(code, message, after)

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            with contextlib.suppress(aiohttp.ClientError, OSError):  # it may be gone already
                await self._ws.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    async def interrupt(self) -> None:
        """Stop the reply (what a stop button or push-to-talk does)."""
        await self.send({"type": "interrupt"})

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
        before = self.readies
        await self.send({"type": "session.start", **fields})
        await self.wait_for(lambda: self.readies > before or bool(self.errors))

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
