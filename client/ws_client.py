"""A small WebSocket client for voxlens (used by `voxlens talk`, the tests and bench)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from client.wavio import last_voiced_sample
from streaming.audio import Float32Array, float_to_pcm16, resample

FRAME_MS = 20


@dataclass
class TurnRecord:
    """What the client saw of one reply."""

    turn_id: int
    transcript: str | None = None
    partials: list[str] = field(default_factory=list)
    text: str = ""
    audio: bytearray = field(default_factory=bytearray)
    metrics: dict[str, float] = field(default_factory=dict)
    first_audio_at: float | None = None  # client clock (time.monotonic)
    done: bool = False


class VoxlensClient:
    """One WebSocket session. Events are collected as they arrive by a reader task."""

    def __init__(self, url: str, *, on_event: Callable[[dict[str, Any]], None] | None = None):
        self.url = url
        self.on_event = on_event
        self.events: list[dict[str, Any]] = []
        self.turns: dict[int, TurnRecord] = {}
        self.ready: dict[str, Any] | None = None
        self.errors: list[dict[str, Any]] = []
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._current: int | None = None  # turn whose audio arrives now
        self._returned: set[int] = set()  # turns already handed out by wait_reply
        self._changed = asyncio.Condition()
        self.closed = asyncio.Event()

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

    @property
    def output_rate(self) -> int:
        assert self.ready is not None
        return int(self.ready["output"]["sample_rate"])

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                now = time.monotonic()
                if msg.type == aiohttp.WSMsgType.BINARY:
                    if self._current is not None:
                        turn = self.turns[self._current]
                        if turn.first_audio_at is None:
                            turn.first_audio_at = now
                        turn.audio.extend(msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    self._on_event(json.loads(msg.data))
                else:
                    break
                async with self._changed:
                    self._changed.notify_all()
        finally:
            self.closed.set()
            async with self._changed:
                self._changed.notify_all()

    def _turn(self, turn_id: int) -> TurnRecord:
        return self.turns.setdefault(turn_id, TurnRecord(turn_id))

    def _on_event(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)
        kind = ev.get("type")
        if kind == "session.ready":
            self.ready = ev
        elif kind == "transcript":
            turn = self._turn(ev["turn_id"])
            if ev["final"]:
                turn.transcript = ev["text"]
            else:
                turn.partials.append(ev["text"])
        elif kind == "reply.started":
            self._current = ev["turn_id"]
            self._turn(ev["turn_id"])
        elif kind == "reply.text":
            self._turn(ev["turn_id"]).text += ev["delta"]
        elif kind == "reply.done":
            self._turn(ev["turn_id"]).done = True
        elif kind == "metrics":
            self._turn(ev["turn_id"]).metrics = ev["stages"]
        elif kind == "error":
            self.errors.append(ev)
        if self.on_event is not None:
            self.on_event(ev)

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 60) -> None:
        """Wait until ``predicate()`` holds (checked after every message)."""
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate() or self.closed.is_set())
            if not predicate():
                raise ConnectionError("connection closed before the awaited event")
        await asyncio.wait_for(wait(), timeout_s)

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
        """Send ``session.start`` and wait for the new ``session.ready``."""
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

    async def wait_reply(self, timeout_s: float = 120) -> TurnRecord:
        """The oldest finished reply (reply.done) not returned before, waiting for one."""
        def fresh() -> list[TurnRecord]:
            return [r for t, r in sorted(self.turns.items())
                    if r.done and t not in self._returned]
        await self.wait_for(lambda: bool(fresh()), timeout_s)
        reply = fresh()[0]
        self._returned.add(reply.turn_id)
        return reply
