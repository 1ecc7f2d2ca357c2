"""The MQTT wire format (docs/PROTOCOL.md, "MQTT"): topics, device ids, the optional audio frame
header and the reorder buffer for sequence-numbered audio. Pure logic: no broker, no loop.
(Several nodes on one broker: streaming/mqtt_fleet.py.)

Topics, per device: ``<prefix>/<device_id>/control`` and ``…/audio/in`` (device → server),
``…/events`` and ``…/audio/out`` (server → device).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar

from streaming.errors import ProtocolError

CONTROL: Final = "control"  # device → server: JSON client messages (QoS 1)
AUDIO_IN: Final = "audio/in"  # device → server: PCM s16le (QoS 0)
EVENTS: Final = "events"  # server → device: JSON events (QoS 1)
AUDIO_OUT: Final = "audio/out"  # server → device: PCM s16le (QoS 0)
Kind = Literal["control", "audio/in", "events", "audio/out"]
QOS: Final[dict[str, int]] = {CONTROL: 1, AUDIO_IN: 0, EVENTS: 1, AUDIO_OUT: 0}

# Letters, digits and a few separators; never '/', '+', '#' (topic levels and wildcards), never a
# leading '$' (broker topics). A mosquitto ACL can then use the id as the username (%u).
DEVICE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,63}")

HEADER = struct.Struct(">I")  # the optional audio frame header: a uint32 sequence number
SEQ_MOD = 1 << 32


def valid_device_id(device_id: str) -> bool:
    return DEVICE_ID.fullmatch(device_id) is not None


def check_prefix(prefix: str) -> str:
    """A topic prefix: one or more non-empty levels, no wildcards, not a ``$`` topic."""
    levels = prefix.split("/")
    if (not prefix or prefix.startswith("$") or any(not level for level in levels)
            or "+" in prefix or "#" in prefix):
        raise ValueError(f"invalid MQTT topic prefix {prefix!r}: use levels like 'voxlens' or "
                         "'home/voxlens', without '+', '#', empty levels or a leading '$'")
    return prefix


def topic(prefix: str, device_id: str, kind: Kind) -> str:
    return f"{prefix}/{device_id}/{kind}"


def subscriptions(prefix: str) -> list[tuple[str, int]]:
    """What the server subscribes to (topic filter, QoS)."""
    return [(f"{prefix}/+/{CONTROL}", QOS[CONTROL]), (f"{prefix}/+/{AUDIO_IN}", QOS[AUDIO_IN])]


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    device_id: str
    kind: Kind


def parse_topic(prefix: str, name: str) -> DeviceTopic | None:
    """The device and kind of a topic under ``prefix``; None for anything else (the device id
    is not validated here: see ``valid_device_id``)."""
    if not name.startswith(prefix + "/"):
        return None
    device_id, _, kind = name[len(prefix) + 1:].partition("/")
    match kind:
        case "control" | "audio/in" | "events" | "audio/out":
            return DeviceTopic(device_id, kind)
    return None


def pack_frame(seq: int, pcm: bytes) -> bytes:
    """An audio message with the sequence header (``seq`` wraps at 2**32)."""
    return HEADER.pack(seq % SEQ_MOD) + pcm


def unpack_frame(payload: bytes) -> tuple[int, bytes]:
    """(sequence number, PCM) of an audio message with the sequence header."""
    if len(payload) < HEADER.size:
        raise ProtocolError(f"audio message of {len(payload)} bytes is shorter than its "
                            f"{HEADER.size}-byte sequence header", code="bad_audio")
    (seq,) = HEADER.unpack_from(payload)
    return seq, payload[HEADER.size:]


T = TypeVar("T")


class Reorderer(Generic[T]):
    """Puts sequence-numbered frames back in order.

    The first frames are held until ``window`` of them arrived (or ``flush``), so a stream whose
    first frames came swapped starts at the lowest. Then a frame that arrives early waits, at
    most ``window`` frames ahead of the one due; a gap the window cannot bridge is given up, and
    the number of frames lost is handed out with the frame after it (so the caller can fill the
    gap with silence and keep its clock). A frame already delivered or given up (a duplicate,
    or too late) is dropped. A jump of more than ``resync`` frames either way means the sender
    restarted its counter: the stream starts over there. ``push`` and ``flush`` return
    ``(frames missing before it, frame)`` pairs.
    """

    def __init__(self, window: int = 8, resync: int = 1000) -> None:
        if not 1 <= window < resync < SEQ_MOD // 2:
            raise ValueError("need 1 <= window < resync < 2**31")
        self.window = window
        self.resync = resync
        self._next: int | None = None  # the sequence number due next (None: still starting)
        self._first = 0  # while starting: the first number seen, to order the others by
        self._held: dict[int, T] = {}
        self._gap = 0  # frames given up since the last delivered one
        self.dropped = 0  # duplicates and frames that came too late
        self.lost = 0  # frames given up
        self.restarts = 0

    @property
    def pending(self) -> int:
        """Frames held back."""
        return len(self._held)

    def push(self, seq: int, item: T) -> list[tuple[int, T]]:
        seq %= SEQ_MOD
        if seq in self._held:
            self.dropped += 1
            return []
        if self._next is None:
            if not self._held:
                self._first = seq
            self._held[seq] = item
            return self._begin() if len(self._held) >= self.window else []
        ahead = (seq - self._next) % SEQ_MOD
        if ahead >= SEQ_MOD // 2:  # behind what is due
            if SEQ_MOD - ahead > self.resync:
                return self._restart(seq, item)
            self.dropped += 1
            return []
        if ahead > self.resync:
            return self._restart(seq, item)
        self._held[seq] = item
        out: list[tuple[int, T]] = []
        if ahead >= self.window:  # the gap is wider than the window: give up on it
            out = self._deliver_until((seq - self.window + 1) % SEQ_MOD)
        return out + self._drain()

    def flush(self) -> list[tuple[int, T]]:
        """Everything held, in order, giving up on the gaps (the sender went quiet)."""
        if self._next is None:
            return self._begin() + self.flush() if self._held else []
        out: list[tuple[int, T]] = []
        while self._held:
            out += self._deliver_until(self._nearest())
            out += self._drain()
        return out

    def _ahead(self, seq: int) -> int:
        assert self._next is not None
        return (seq - self._next) % SEQ_MOD

    def _nearest(self) -> int:
        return min(self._held, key=self._ahead)

    def _begin(self) -> list[tuple[int, T]]:
        """Start the stream at the lowest frame held (ordered from the first one seen)."""
        def rel(seq: int) -> int:
            d = (seq - self._first) % SEQ_MOD
            return d - SEQ_MOD if d >= SEQ_MOD // 2 else d
        low = min(self._held, key=rel)
        self._next = low
        high = max(self._held, key=rel)
        out: list[tuple[int, T]] = []
        if self._ahead(high) >= self.window:
            out = self._deliver_until((high - self.window + 1) % SEQ_MOD)
        return out + self._drain()

    def _deliver_until(self, target: int) -> list[tuple[int, T]]:
        """Deliver what is held before ``target`` and give up on the rest before it."""
        out: list[tuple[int, T]] = []
        while (distance := self._ahead(target)) > 0:
            assert self._next is not None
            if self._next in self._held:
                out += self._take()
                continue
            ahead_held = [self._ahead(s) for s in self._held]
            skip = min([distance, *ahead_held])
            self._gap += skip
            self.lost += skip
            self._next = (self._next + skip) % SEQ_MOD
        return out

    def _take(self) -> list[tuple[int, T]]:
        assert self._next is not None
        item = self._held.pop(self._next)
        self._next = (self._next + 1) % SEQ_MOD
        gap, self._gap = self._gap, 0
        return [(gap, item)]

    def _drain(self) -> list[tuple[int, T]]:
        out: list[tuple[int, T]] = []
        while self._next in self._held:
            out += self._take()
        return out

    def _restart(self, seq: int, item: T) -> list[tuple[int, T]]:
        out = self.flush()
        self.restarts += 1
        self._next, self._gap = seq, 0
        self._held[seq] = item
        return out + self._drain()
