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
    last_audio_at: float | None = None
    done: bool = False
    interrupted: dict[str, Any] | None = None  # the reply.interrupted event
    late_audio: int = 0  # bytes of its audio that arrived after reply.interrupted
    played_when_cut: float | None = None  # ms its speaker had played at reply.interrupted


class EventLog:
    """Collects protocol events and reply audio; lets a caller wait for a condition.

    It also models the client's speaker: reply audio plays as it arrives, in real time, so
    ``played_ms`` is what a person would have heard so far (sent to the server as
    ``playback`` reports, and stopped at ``reply.interrupted``).
    """

    def __init__(self, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.on_event = on_event
        self.on_audio: Callable[[bytes], None] | None = None  # every reply audio piece received
        self.events: list[dict[str, Any]] = []
        self.arrivals: list[float] = []  # client clock (time.monotonic) of each event
        self.turns: dict[int, TurnRecord] = {}
        self.ready: dict[str, Any] | None = None
        self.errors: list[dict[str, Any]] = []
        self.closed = asyncio.Event()
        self._current: int | None = None  # turn whose audio arrives now
        self._play_end = 0.0  # client clock when the received audio will have played
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
        if self.on_audio is not None:
            self.on_audio(pcm)
        if self._current is not None:
            turn = self.turns[self._current]
            now = time.monotonic()
            if turn.interrupted is not None:
                turn.late_audio += len(pcm)
            else:
                if turn.first_audio_at is None:
                    turn.first_audio_at = now
                turn.last_audio_at = now
                turn.audio.extend(pcm)
                self._play_end = max(self._play_end, now) + len(pcm) / 2 / self.output_rate
        await self._notify()

    def played_ms(self, turn_id: int) -> float:
        """How much of a turn's reply audio the speaker has played by now."""
        turn = self.turns[turn_id]
        if turn.played_when_cut is not None:
            return turn.played_when_cut
        received = len(turn.audio) / 2 * 1000 / self.output_rate
        if turn_id != self._current:
            return received
        return max(0.0, received - max(0.0, self._play_end - time.monotonic()) * 1000)

    def playback_report(self) -> dict[str, Any] | None:
        """The ``playback`` message for the reply playing now (None when none is)."""
        turn = self.turns.get(self._current) if self._current is not None else None
        if turn is None or not turn.audio or turn.interrupted is not None:
            return None
        if time.monotonic() > self._play_end + 0.5:
            return None  # played out a while ago: nothing more to say
        return {"type": "playback", "turn_id": turn.turn_id,
                "played_ms": round(self.played_ms(turn.turn_id))}

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
            case "reply.interrupted":
                turn = self._turn(ev["turn_id"])
                turn.played_when_cut = self.played_ms(turn.turn_id)
                if ev["turn_id"] == self._current:
                    self._play_end = time.monotonic()  # the speaker stops, what is queued is gone
                turn.interrupted = ev
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
        try:
            await asyncio.wait_for(wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"nothing awaited came in {timeout_s} s; the last events: "
                               f"{self.summary()}") from None

    def summary(self, last: int = 30) -> str:
        """The latest events in short, for the message of a failed wait."""
        def short(ev: dict[str, Any]) -> str:
            detail = {k: v for k, v in ev.items() if k != "type" and k != "data"}
            return f"{ev.get('type')} {detail}" if detail else str(ev.get("type"))
        evs = [e for e in self.events if e.get("type") != "reply.text"][-last:]
        turns = [f"turn {t}: {r.transcript!r} -> {r.text!r}" for t, r in sorted(self.turns.items())]
        return "; ".join(short(e) for e in evs) + " | " + "; ".join(turns)

    async def wait_reply(self, timeout_s: float = 120) -> TurnRecord:
        """The oldest finished reply (reply.done) not returned before, waiting for one."""
        def fresh() -> list[TurnRecord]:
            return [r for t, r in sorted(self.turns.items())
                    if r.done and t not in self._returned]
        await self.wait_for(lambda: bool(fresh()), timeout_s)
        reply = fresh()[0]
        self._returned.add(reply.turn_id)
        return reply
