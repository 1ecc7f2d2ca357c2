"""What a client saw of a conversation: events, turns and reply audio (shared by all clients)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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


class EventLog:
    """Collects protocol events and reply audio; lets a caller wait for a condition."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.on_event = on_event
        self.events: list[dict[str, Any]] = []
        self.arrivals: list[float] = []  # client clock (time.monotonic) of each event
        self.turns: dict[int, TurnRecord] = {}
        self.ready: dict[str, Any] | None = None
        self.errors: list[dict[str, Any]] = []
        self.closed = asyncio.Event()
        self._current: int | None = None  # turn whose audio arrives now
        self._returned: set[int] = set()  # turns already handed out by wait_reply
        self._changed = asyncio.Condition()

    @property
    def output_rate(self) -> int:
        assert self.ready is not None
        return int(self.ready["output"]["sample_rate"])

    def _turn(self, turn_id: int) -> TurnRecord:
        return self.turns.setdefault(turn_id, TurnRecord(turn_id))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def add_audio(self, pcm: bytes) -> None:
        """Reply audio (s16le mono at the output rate) of the turn last started."""
        if self._current is not None:
            turn = self.turns[self._current]
            if turn.first_audio_at is None:
                turn.first_audio_at = time.monotonic()
            turn.audio.extend(pcm)
        await self._notify()

    async def add_event(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)
        self.arrivals.append(time.monotonic())
        match ev.get("type"):
            case "session.ready":
                self.ready = ev
            case "transcript":
                turn = self._turn(ev["turn_id"])
                if ev["final"]:
                    turn.transcript = ev["text"]
                else:
                    turn.partials.append(ev["text"])
            case "reply.started":
                self._current = ev["turn_id"]
                self._turn(ev["turn_id"])
            case "reply.text":
                self._turn(ev["turn_id"]).text += ev["delta"]
            case "reply.done":
                self._turn(ev["turn_id"]).done = True
            case "metrics":
                self._turn(ev["turn_id"]).metrics = ev["stages"]
            case "error":
                self.errors.append(ev)
        if self.on_event is not None:
            self.on_event(ev)
        await self._notify()

    async def mark_closed(self) -> None:
        self.closed.set()
        await self._notify()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 60) -> None:
        """Wait until ``predicate()`` holds (checked after every event and audio piece)."""
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate() or self.closed.is_set())
            if not predicate():
                raise ConnectionError("connection closed before the awaited event")
        await asyncio.wait_for(wait(), timeout_s)

    async def wait_reply(self, timeout_s: float = 120) -> TurnRecord:
        """The oldest finished reply (reply.done) not returned before, waiting for one."""
        def fresh() -> list[TurnRecord]:
            return [r for t, r in sorted(self.turns.items())
                    if r.done and t not in self._returned]
        await self.wait_for(lambda: bool(fresh()), timeout_s)
        reply = fresh()[0]
        self._returned.add(reply.turn_id)
        return reply
