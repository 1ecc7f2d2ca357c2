"""Reply audio on its way to a speaker, and what the server hears of it: ``PlaybackBuffer``
(the queue the speaker's clock drains: ``voxlens speaker`` and ``voxlens desktop``) and
``PlaybackReporter`` (the ``playback`` reports every client sends while a reply plays, so
barge-in knows what the person heard).

The buffer is written on the event loop and read by the sound device's thread (or a thread
that paces it), so its state sits behind a lock held for microseconds.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

KEEP_TURNS = 16  # played counts (and cuts) remembered for this many recent turns
REPORT_EVERY_S = 0.2  # playback reports while a reply plays (docs/PROTOCOL.md, `playback`)


@dataclass(slots=True)
class _Segment:
    turn_id: int
    pcm: bytearray


class PlaybackBuffer:
    """Reply audio (s16le mono at ``rate``) waiting for the speaker, turn after turn.

    ``prebuffer_ms``: a turn starts playing once that much of it is queued, or once its audio
    stopped coming for that long (the tail of a reply), and an underrun (the network fell
    behind) buffers again, so network jitter becomes a small fixed delay instead of crackles
    (the speaker client: audio over MQTT or a WebSocket). 0: audio plays as it comes (the
    desktop app: WebRTC's own jitter buffer came first).

    A cut turn (``reply.interrupted``, or the person taking the floor) is dropped at once, with
    any of its audio that still arrives. At most ``max_ms`` waits: beyond it the oldest audio
    goes (the reply comes in real time, so only a stalled output fills it). ``played_ms`` counts
    what of each recent turn was handed to the speaker.
    """

    def __init__(self, rate: int, *, prebuffer_ms: int = 0, max_ms: int = 30_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.prebuffer_ms = prebuffer_ms
        self._max_bytes = rate * 2 * max_ms // 1000
        self._clock = clock
        self._lock = threading.Lock()
        self._segments: collections.deque[_Segment] = collections.deque()
        self._queued = 0  # bytes in the segments
        self._cut: collections.deque[int] = collections.deque(maxlen=KEEP_TURNS)
        self._playing = False  # past the prebuffer of the segment at the head
        self._last_write = 0.0
        self._played: dict[int, int] = {}  # turn → bytes handed to the speaker
        self._last_pull: dict[int, float] = {}  # turn → when its audio was last handed out
        self.last_turn: int | None = None  # the turn heard last (None after it was cut)
        self.dry = 0  # times the queue ran dry: an underrun, or the end of a reply
        self.overflow = 0  # bytes dropped because the buffer was full

    def _bytes(self, ms: float) -> int:
        return int(self.rate * ms / 1000) * 2

    def _ms(self, nbytes: int) -> float:
        return nbytes / 2 * 1000 / self.rate

    def queued_ms(self, turn_id: int | None = None) -> float:
        """Audio waiting: of one turn, or of all."""
        with self._lock:
            if turn_id is None:
                return self._ms(self._queued)
            return self._ms(sum(len(s.pcm) for s in self._segments if s.turn_id == turn_id))

    def idle_for(self) -> float:
        """Seconds since the last reply audio arrived, 0 while some is still queued."""
        with self._lock:
            if self._queued:
                return 0.0
            return self._clock() - self._last_write

    # ---- the network side --------------------------------------------------------------

    def write(self, turn_id: int, pcm: bytes) -> None:
        """Reply audio of ``turn_id``, after what is queued (dropped when the turn was cut)."""
        with self._lock:
            if turn_id in self._cut or not pcm:
                return
            if self._segments and self._segments[-1].turn_id == turn_id:
                self._segments[-1].pcm.extend(pcm)
            else:
                self._segments.append(_Segment(turn_id, bytearray(pcm)))
            self._queued += len(pcm)
            self._last_write = self._clock()
            while self._queued > self._max_bytes:  # the oldest goes
                head = self._segments[0]
                drop = min(len(head.pcm), self._queued - self._max_bytes)
                del head.pcm[:drop]
                self._queued -= drop
                self.overflow += drop
                if not head.pcm and len(self._segments) > 1:
                    self._segments.popleft()
                    self._playing = False

    def cut(self, turn_id: int) -> None:
        """Drop a turn's queued audio, and any of it that still arrives."""
        with self._lock:
            if turn_id not in self._cut:
                self._cut.append(turn_id)
            if self._segments and self._segments[0].turn_id == turn_id:
                self._playing = False
            kept = [s for s in self._segments if s.turn_id != turn_id]
            self._queued = sum(len(s.pcm) for s in kept)
            self._segments = collections.deque(kept)
            if self.last_turn == turn_id:
                self.last_turn = None

    def clear(self) -> None:
        """A new session: everything queued goes, and what was known of its turns (the next
        session numbers its turns afresh)."""
        with self._lock:
            self._segments.clear()
            self._queued = 0
            self._cut.clear()
            self._played.clear()
            self._last_pull.clear()
            self._playing = False
            self.last_turn = None

    # ---- the speaker side --------------------------------------------------------------

    def read(self, nbytes: int) -> bytes:
        """Up to ``nbytes`` of reply audio to play now, all of one turn; b"" when none is
        ready (nothing queued, or a turn still filling its prebuffer)."""
        with self._lock:
            return self._take(nbytes, self._clock())

    def fill(self, nbytes: int) -> bytes:
        """Exactly ``nbytes`` for the speaker: queued reply audio, silence where there is none."""
        out = bytearray()
        now = self._clock()
        with self._lock:
            while len(out) < nbytes and (chunk := self._take(nbytes - len(out), now)):
                out += chunk
        out += bytes(nbytes - len(out))
        return bytes(out)

    def _take(self, nbytes: int, now: float) -> bytes:
        """The head turn's next audio (under the lock)."""
        while self._segments:
            seg = self._segments[0]
            last = len(self._segments) == 1  # audio of this turn may still come
            if seg.pcm:
                break
            if last:
                return b""
            self._segments.popleft()  # the next turn starts with its own prebuffer
            self._playing = False
        else:
            return b""
        if not self._playing:  # a whole turn (another follows it) plays at once
            enough = len(seg.pcm) >= self._bytes(self.prebuffer_ms)
            waited = now - self._last_write >= self.prebuffer_ms / 1000 - 1e-6
            if last and not enough and not waited:
                return b""
            self._playing = True
        chunk = bytes(seg.pcm[:nbytes])
        del seg.pcm[:len(chunk)]
        self._queued -= len(chunk)
        self._count(seg.turn_id, len(chunk), now)
        if not seg.pcm:
            if last:  # ran dry: wait for more (or the tail is complete)
                self.dry += 1
                self._playing = False
            else:
                self._segments.popleft()
                self._playing = False
        return chunk

    def _count(self, turn_id: int, nbytes: int, now: float) -> None:
        self._played[turn_id] = self._played.get(turn_id, 0) + nbytes
        self._last_pull[turn_id] = now
        self.last_turn = turn_id
        while len(self._played) > KEEP_TURNS:
            oldest = next(iter(self._played))
            del self._played[oldest]
            self._last_pull.pop(oldest, None)

    def played_ms(self, turn_id: int, latency_ms: float = 0.0) -> float:
        """What of a turn the person has heard: audio handed to the speaker, less what is
        still inside the sound device (``latency_ms`` of it, if it was handed out just now)."""
        with self._lock:
            handed = self._ms(self._played.get(turn_id, 0))
            since_ms = (self._clock() - self._last_pull.get(turn_id, 0.0)) * 1000
        return max(0.0, handed - max(0.0, latency_ms - since_ms))


Playing = Callable[[], tuple[int, int] | None]  # (turn, ms played) of the reply playing, or None


class PlaybackReporter:
    """Tells the server how much of the reply playing now its speaker has played: every
    ``every_s`` it asks ``playing`` (the turn and its ms played, None while no reply plays or
    the client cannot send) and sends ``{"type": "playback", "turn_id", "played_ms"}`` through
    ``send`` when that changed, so the count at the end of a reply goes out too. A send that
    fails with ConnectionError is tried again at the next tick (the connection's owner sees
    the connection end). ``run`` is the loop; its owner runs it as one of its tasks and cancels
    it."""

    def __init__(self, playing: Playing, send: Callable[[dict[str, Any]], Awaitable[None]],
                 every_s: float = REPORT_EVERY_S) -> None:
        self.playing = playing
        self.send = send
        self.every_s = every_s
        self.last: tuple[int, int] | None = None  # the last report sent

    async def run(self) -> None:
        """Report until cancelled."""
        while True:
            await asyncio.sleep(self.every_s)
            await self.report()

    async def report(self) -> None:
        """One tick: send the count if it changed."""
        now = self.playing()
        if now is None:
            self.last = None  # after a pause (a reply played out, no connection) say it afresh
            return
        if now == self.last:
            return
        turn_id, played_ms = now
        try:
            await self.send({"type": "playback", "turn_id": turn_id, "played_ms": played_ms})
        except ConnectionError:
            return
        self.last = now
