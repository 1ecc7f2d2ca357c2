"""What a client saw of a conversation: its events, its turns and their reply audio (the
WebSocket and WebRTC clients, ``voxlens talk``, the tests and the benchmarks keep one each)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from client.common.events import (
    Error,
    JsonEvent,
    Metrics,
    Ready,
    ReplyDone,
    ReplyInterrupted,
    ReplyStarted,
    ReplyText,
    Transcript,
    WireEvent,
    decode_event,
)

PLAYED_OUT_S = 0.5  # a reply that finished playing this long ago is no longer reported


@dataclass
class TurnRecord:
    """What the client saw of one reply. ``audio`` is a recording of all its reply audio that
    came before it was cut (the tests and ``talk --out`` keep it; nothing plays from it)."""

    turn_id: int
    transcript: str | None = None
    partials: list[str] = field(default_factory=list)
    text: str = ""
    audio: bytearray = field(default_factory=bytearray)
    voiced: int = 0  # bytes of ``audio`` up to its latest sound (WebRTC: what has played)
    metrics: dict[str, float] = field(default_factory=dict)
    first_audio_at: float | None = None  # client clock (time.monotonic)
    last_audio_at: float | None = None
    done: bool = False
    interrupted: ReplyInterrupted | None = None  # the reply.interrupted event
    late_audio: int = 0  # bytes of its audio that arrived after reply.interrupted
    played_when_cut: float | None = None  # ms its speaker had played at reply.interrupted


class EventLog:
    """Collects protocol events and reply audio; lets a caller wait for a condition.

    ``events`` keeps every event as it came (JSON objects, in order, with their arrival times
    in ``arrivals``); the log itself reads them as typed events (``decode_event``) and ignores
    those it cannot read. ``ready`` is the latest ``session.ready`` and ``errors`` the
    ``error`` events, as they came (``session`` is that ``session.ready`` typed); ``turns``
    what the log made of them. ``on_event`` is told of every event (as it came) after the log
    took it.

    It also models the client's speaker: reply audio plays as it arrives, in real time, so
    ``played_ms`` is what a person would have heard so far (``playing`` says it for the
    playback reporter, until ``reply.interrupted`` stops it).
    """

    def __init__(self, on_event: Callable[[JsonEvent], None] | None = None) -> None:
        self.on_event = on_event
        self.on_audio: Callable[[bytes], None] | None = None  # every reply audio piece received
        self.events: list[JsonEvent] = []
        self.arrivals: list[float] = []  # client clock (time.monotonic) of each event
        self.turns: dict[int, TurnRecord] = {}
        self.ready: JsonEvent | None = None
        self.session: Ready | None = None  # the latest session.ready, typed
        self.readies = 0  # how many session.ready came
        self.errors: list[JsonEvent] = []  # the error events
        self.closed = asyncio.Event()
        self._current: int | None = None  # turn whose audio arrives now
        self._play_end = 0.0  # client clock when the received audio will have played
        self._returned: set[int] = set()  # turns already handed out by wait_reply
        self._changed = asyncio.Condition()

    @property
    def output_rate(self) -> int:
        """The reply audio's sample rate, as the session said."""
        if self.session is None or self.session.output_rate is None:
            raise RuntimeError("no session.ready with the output sample rate came yet")
        return self.session.output_rate

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

    def playing(self) -> tuple[int, int] | None:
        """The reply playing now and the ms of it played (for the playback reporter); None
        when none is (none yet, cut, or played out a while ago)."""
        turn = self.turns.get(self._current) if self._current is not None else None
        if turn is None or not turn.audio or turn.interrupted is not None:
            return None
        if time.monotonic() > self._play_end + PLAYED_OUT_S:
            return None  # nothing more to say
        return turn.turn_id, round(self.played_ms(turn.turn_id))

    async def add_event(self, raw: JsonEvent) -> None:
        """An event as it came on the wire."""
        self.events.append(raw)
        self.arrivals.append(time.monotonic())
        self._take(decode_event(raw), raw)
        if self.on_event is not None:
            self.on_event(raw)
        await self._notify()

    def _take(self, event: WireEvent, raw: JsonEvent) -> None:
        match event:
            case Ready():
                self.ready, self.session = raw, event
                self.readies += 1
            case Transcript(turn_id, text, final=True):
                self._turn(turn_id).transcript = text
            case Transcript(turn_id, text):
                self._turn(turn_id).partials.append(text)
            case ReplyStarted(turn_id):
                self._current = turn_id
                self._turn(turn_id)
            case ReplyText(turn_id, delta):
                self._turn(turn_id).text += delta
            case ReplyDone(turn_id):
                self._turn(turn_id).done = True
            case ReplyInterrupted(turn_id):
                turn = self._turn(turn_id)
                turn.played_when_cut = self.played_ms(turn_id)
                if turn_id == self._current:
                    self._play_end = time.monotonic()  # the speaker stops, what is queued is gone
                turn.interrupted = event
            case Metrics(turn_id, stages):
                self._turn(turn_id).metrics = stages
            case Error():
                self.errors.append(raw)

    async def mark_closed(self) -> None:
        self.closed.set()
        await self._notify()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float | None = 60) -> None:
        """Wait until ``predicate()`` holds (checked after every event and audio piece); None:
        for as long as it takes (the caller bounds it)."""
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate() or self.closed.is_set())
            if not predicate():
                raise ConnectionError("connection closed before the awaited event")
        try:
            async with asyncio.timeout(timeout_s):
                await wait()
        except TimeoutError:
            raise TimeoutError(f"nothing awaited came in {timeout_s} s; the last events: "
                               f"{self.summary()}") from None

    def summary(self, last: int = 30) -> str:
        """The latest events in short, for the message of a failed wait."""
        def short(ev: JsonEvent) -> str:
            detail = {k: v for k, v in ev.items() if k != "type" and k != "data"}
            return f"{ev.get('type')} {detail}" if detail else str(ev.get("type"))
        evs = [e for e in self.events if e.get("type") != "reply.text"][-last:]
        turns = [f"turn {t}: {r.transcript!r} -> {r.text!r}" for t, r in sorted(self.turns.items())]
        return "; ".join(short(e) for e in evs) + " | " + "; ".join(turns)

    async def wait_reply(self, timeout_s: float | None = 120) -> TurnRecord:
        """The oldest finished reply (reply.done) not returned before, waiting for one."""
        def fresh() -> list[TurnRecord]:
            return [r for t, r in sorted(self.turns.items())
                    if r.done and t not in self._returned]
        await self.wait_for(lambda: bool(fresh()), timeout_s)
        reply = fresh()[0]
        self._returned.add(reply.turn_id)
        return reply
