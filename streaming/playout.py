"""The outgoing reply audio of one connection: queued per turn, sent in real time, pausable.

Every transport drains its session's reply audio through a ``Playout``: WebRTC's
track takes a 20 ms frame per tick; WebSocket and MQTT send paced chunks at
most ``lead_ms`` ahead of real time. Audio that has not left can still be
paused (barge-in: the person may be starting to speak), resumed (it was a
cough) or cut (a real interruption). The playout counts what it sent of each
turn and estimates what is still unplayed at the client, so the session knows
what the person heard. Events that must follow a turn's audio (``reply.done``,
``metrics``) wait here and are released into the session's event channel as its
last chunk is taken (``release``): behind every earlier event of the turn, after
its audio, whatever the transport. Every sent byte also goes to the
``reference`` when the server cancels the client's echo (the microphone side
owns the canceller, ``streaming/microphone.py``).

The session owns its playout and writes reply audio straight into it; the
transport only drains it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from streaming.events import Event

KEEP_TURNS = 8  # sent_ms is remembered for this many recent turns
# When the server cancels the client's echo, a reply can still be heard back this long after
# it played: the room's delay and reverberation, the microphone's way back, voice detection.
ECHO_TAIL_MS = 1000


@dataclass(slots=True)
class _Segment:
    turn_id: int
    pcm: bytearray


class EchoReference(Protocol):
    """Where the sent reply audio goes when the server cancels the client's echo."""

    def played(self, pcm: bytes) -> None: ...

    def forget_unplayed(self) -> None: ...


class Playout:
    def __init__(self, rate: int, *, release: Callable[[Event], None], max_buffer_ms: int = 2000,
                 client_buffer_ms: int = 100, clock: Callable[[], float] = time.monotonic) -> None:
        """``release``: where the events held for a turn's audio go once it has been taken
        (the session's event channel)."""
        self.rate = rate
        self._release = release
        self.reference: EchoReference | None = None  # the echo canceller, when the server has one
        self.client_buffer_ms = client_buffer_ms  # played-out delay at the client (jitter buffer)
        self._max_ms = max_buffer_ms
        self._max_bytes = rate * 2 * max_buffer_ms // 1000
        self._clock = clock
        self._queue: collections.deque[_Segment] = collections.deque()
        self._queued = 0  # bytes
        self._sent: dict[int, float] = {}  # turn → ms of its audio sent
        self._cut: collections.deque[int] = collections.deque(maxlen=KEEP_TURNS)
        self._last_turn: int | None = None  # the turn whose audio left last
        self._deferred: list[tuple[int, Event]] = []  # events to send after a turn's audio
        self._play_end = 0.0  # wall time when everything sent so far has played at the client
        self.paused = False
        self._room = asyncio.Event()
        self._room.set()
        self._ready = asyncio.Event()  # audio queued and not paused

    def reconfigure(self, rate: int) -> None:
        """A new output rate (``session.start``); drops queued audio."""
        self.rate = rate
        self._max_bytes = rate * 2 * self._max_ms // 1000
        self._queue.clear()
        self._queued = 0
        self._ready.clear()
        self._room.set()

    # ---- the session's side -----------------------------------------------------------

    @property
    def last_turn(self) -> int | None:
        """The turn whose audio ``take`` returned last."""
        return self._last_turn

    def sent_ms(self, turn_id: int) -> float:
        return self._sent.get(turn_id, 0.0)

    def unplayed_ms(self) -> float:
        """Sent audio the client has probably not played yet: what it was sent ahead of real
        time, plus its jitter buffer."""
        if self._last_turn is None:
            return 0.0
        return max(0.0, self._play_end - self._clock()) * 1000 + self.client_buffer_ms

    def heard_ms(self, turn_id: int) -> float:
        """The estimate of a turn's audio the person heard, when the client reports nothing."""
        sent = self.sent_ms(turn_id)
        if turn_id != self._last_turn:
            return sent
        return max(0.0, sent - self.unplayed_ms())

    def audible(self, turn_id: int) -> bool:
        """Whether the turn's audio is queued here or still playing at the client."""
        if any(s.turn_id == turn_id for s in self._queue):
            return True
        return (self._last_turn == turn_id
                and self._clock() < self._play_end + self.client_buffer_ms / 1000)

    def echoing(self, turn_id: int) -> bool:
        """Whether the turn's audio can still be in the microphone input: while it is audible,
        and for ``ECHO_TAIL_MS`` more when the server cancels this client's echo."""
        if self.audible(turn_id):
            return True
        return (self.reference is not None and self._last_turn == turn_id
                and self._clock() < self._play_end + (self.client_buffer_ms + ECHO_TAIL_MS) / 1000)

    def queued_ms(self, turn_id: int | None = None) -> float:
        n = sum(len(s.pcm) for s in self._queue if turn_id is None or s.turn_id == turn_id)
        return n / 2 * 1000 / self.rate

    def pause(self) -> None:
        self.paused = True
        self._ready.clear()

    def resume(self) -> None:
        self.paused = False
        if self._queued:
            self._ready.set()

    def cut(self, turn_id: int) -> None:
        """Drop the turn's queued audio and refuse its later audio; un-pause."""
        if turn_id not in self._cut:
            self._cut.append(turn_id)
        for seg in [s for s in self._queue if s.turn_id == turn_id]:
            self._queue.remove(seg)
            self._queued -= len(seg.pcm)
        self._deferred = [(t, e) for t, e in self._deferred if t != turn_id]
        if self.reference is not None and turn_id == self._last_turn:
            self.reference.forget_unplayed()
        self._room.set()
        self.resume()
        if not self._queued:
            self._ready.clear()

    def after_audio(self, turn_id: int, event: Event) -> bool:
        """Hold an event (``reply.done``) until the turn's queued audio has been taken; then it
        is released. False when none is queued (send it now). A cut turn's held events are
        dropped."""
        if not any(s.turn_id == turn_id for s in self._queue):
            return False
        self._deferred.append((turn_id, event))
        return True

    def put(self, turn_id: int, pcm: bytes) -> None:
        """Queue a turn's reply audio (never waits: the session waits for ``room`` before it
        puts more). A cut turn's audio is dropped."""
        if turn_id in self._cut or not pcm:
            return
        if turn_id not in self._sent:
            self._sent[turn_id] = 0.0
            while len(self._sent) > KEEP_TURNS:
                del self._sent[next(iter(self._sent))]
        if self._queue and self._queue[-1].turn_id == turn_id:
            self._queue[-1].pcm.extend(pcm)
        else:
            self._queue.append(_Segment(turn_id, bytearray(pcm)))
        self._queued += len(pcm)
        if self._queued >= self._max_bytes:
            self._room.clear()
        if not self.paused:
            self._ready.set()

    async def room(self) -> None:
        """Wait until less than ``max_buffer_ms`` is queued."""
        await self._room.wait()

    # ---- the transport's side ---------------------------------------------------------

    def take(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of queued audio to send now (b"" when idle or paused); the
        events held for its turn are released when it is the turn's last."""
        if self.paused or not self._queue:
            return b""
        seg = self._queue[0]
        chunk = bytes(seg.pcm[:max_bytes])
        del seg.pcm[:max_bytes]
        after: list[Event] = []
        if not seg.pcm:
            self._queue.popleft()
            if self._deferred and not any(s.turn_id == seg.turn_id for s in self._queue):
                after = [e for t, e in self._deferred if t == seg.turn_id]
                self._deferred = [(t, e) for t, e in self._deferred if t != seg.turn_id]
        self._queued -= len(chunk)
        if not self._queued:
            self._ready.clear()
        if self._queued < self._max_bytes:
            self._room.set()
        ms = len(chunk) / 2 * 1000 / self.rate
        self._sent[seg.turn_id] = self._sent.get(seg.turn_id, 0.0) + ms
        self._last_turn = seg.turn_id
        self._play_end = max(self._play_end, self._clock()) + ms / 1000
        if self.reference is not None:
            self.reference.played(chunk)
        for event in after:
            self._release(event)
        return chunk

    async def paced(self, chunk_ms: int, lead_ms: int) -> AsyncIterator[bytes]:
        """Queued audio in chunks of ``chunk_ms``, sent as soon as the client holds less than
        ``lead_ms`` of unplayed audio: the first chunk of a reply leaves at once, the rest in
        real time. Runs until cancelled."""
        size = self.rate * chunk_ms // 1000 * 2
        while True:
            await self._ready.wait()
            wait = self._play_end - self._clock() - lead_ms / 1000
            if wait > 0.001:
                await asyncio.sleep(wait)
                continue
            chunk = self.take(size)
            if chunk:
                yield chunk
