"""The speaker client's playback side: reply audio waits in a jitter buffer that the speaker's
clock drains, so network jitter becomes a small fixed delay instead of crackles.

A turn starts playing once ``prebuffer_ms`` of it is queued, or when its audio stopped coming
for that long (the tail of a reply); an underrun (the network fell behind) buffers again. A
flushed turn (``reply.interrupted``, or push-to-talk cutting the reply) is dropped at once,
with any of its audio that still arrives. ``read`` is called from the sound device's thread,
so the state sits behind a lock held for microseconds.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

KEEP_TURNS = 16  # played counts remembered for this many recent turns


@dataclass(slots=True)
class _Segment:
    turn_id: int
    pcm: bytearray


class JitterBuffer:
    def __init__(self, rate: int, *, prebuffer_ms: int = 120, max_ms: int = 30_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.prebuffer_ms = prebuffer_ms
        self._max_bytes = rate * 2 * max_ms // 1000
        self._clock = clock
        self._lock = threading.Lock()
        self._segments: collections.deque[_Segment] = collections.deque()
        self._writing: int | None = None  # the turn incoming audio belongs to
        self._flushed: collections.deque[int] = collections.deque(maxlen=KEEP_TURNS)
        self._playing = False  # past the prebuffer of the segment at the head
        self._last_write = 0.0
        self._played: dict[int, int] = {}  # turn → bytes handed to the speaker
        self._last_pull: dict[int, float] = {}  # turn → when its audio was last handed out
        self.last_turn: int | None = None  # the turn heard last (None after it was flushed)
        self.dry = 0  # times the queue ran dry: an underrun, or the end of a reply
        self.overflow = 0  # bytes dropped because the buffer was full

    def _bytes(self, ms: float) -> int:
        return int(self.rate * ms / 1000) * 2

    def queued_ms(self) -> float:
        with self._lock:
            return sum(len(s.pcm) for s in self._segments) / 2 * 1000 / self.rate

    def idle_for(self) -> float:
        """Seconds since the last reply audio arrived, 0 while some is still queued."""
        with self._lock:
            if any(s.pcm for s in self._segments):
                return 0.0
            return self._clock() - self._last_write

    # ---- the network side --------------------------------------------------------------

    def start_turn(self, turn_id: int) -> None:
        """``reply.started``: the audio that follows belongs to this turn."""
        with self._lock:
            self._writing = turn_id

    def write(self, pcm: bytes) -> None:
        """Reply audio (s16le mono at ``rate``) of the turn last started."""
        with self._lock:
            turn = self._writing
            if turn is None or turn in self._flushed or not pcm:
                return
            queued = sum(len(s.pcm) for s in self._segments)
            if queued + len(pcm) > self._max_bytes:
                self.overflow += len(pcm)
                return
            if self._segments and self._segments[-1].turn_id == turn:
                self._segments[-1].pcm.extend(pcm)
            else:
                self._segments.append(_Segment(turn, bytearray(pcm)))
            self._last_write = self._clock()

    def flush(self, turn_id: int) -> None:
        """Drop a turn's queued audio, and any of it that still arrives."""
        with self._lock:
            if turn_id not in self._flushed:
                self._flushed.append(turn_id)
            kept = [s for s in self._segments if s.turn_id != turn_id]
            if self._segments and self._segments[0].turn_id == turn_id:
                self._playing = False
            self._segments = collections.deque(kept)
            if self.last_turn == turn_id:
                self.last_turn = None

    # ---- the speaker side --------------------------------------------------------------

    def read(self, nbytes: int) -> bytes:
        """Exactly ``nbytes`` for the speaker: queued reply audio, silence where there is none."""
        out = bytearray()
        now = self._clock()
        with self._lock:
            while len(out) < nbytes and self._segments:
                seg = self._segments[0]
                last = len(self._segments) == 1  # audio of this turn may still come
                if not seg.pcm:
                    if last:
                        break
                    self._segments.popleft()  # the next turn starts with its own prebuffer
                    self._playing = False
                    continue
                if not self._playing:
                    waited = now - self._last_write >= self.prebuffer_ms / 1000 - 1e-6
                    if not last or len(seg.pcm) >= self._bytes(self.prebuffer_ms) or waited:
                        self._playing = True
                    else:
                        break
                take = seg.pcm[:nbytes - len(out)]
                del seg.pcm[:len(take)]
                out += take
                self._played[seg.turn_id] = self._played.get(seg.turn_id, 0) + len(take)
                self._last_pull[seg.turn_id] = now
                self.last_turn = seg.turn_id
                while len(self._played) > KEEP_TURNS:
                    oldest = next(iter(self._played))
                    del self._played[oldest]
                    self._last_pull.pop(oldest, None)
                if not seg.pcm and last:  # ran dry: wait for more (or the tail is complete)
                    self.dry += 1
                    self._playing = False
        out += bytes(nbytes - len(out))
        return bytes(out)

    def played_ms(self, turn_id: int, latency_ms: float = 0.0) -> float:
        """What of a turn the person has heard: audio handed to the speaker, less what is
        still inside the sound device (``latency_ms`` of it, if it was handed out just now)."""
        with self._lock:
            handed = self._played.get(turn_id, 0) / 2 * 1000 / self.rate
            since_ms = (self._clock() - self._last_pull.get(turn_id, 0.0)) * 1000
        return max(0.0, handed - max(0.0, latency_ms - since_ms))
