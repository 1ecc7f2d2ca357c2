"""The desktop app's own events (never on the wire): the app tells them, with the server's, to
whatever shows the conversation (the window, or stdout as JSON lines when headless). They
travel as JSON objects like the server's (``json()``); ``decode_desktop_event`` reads either
kind as a typed event."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from client.common.console import print_json
from client.common.events import (
    Fields,
    JsonEvent,
    Malformed,
    ReplyText,
    Unknown,
    WireEvent,
    decode_event,
)

TYPED = "desktop.typed"
PLAYED = "desktop.played"
MUTED = "desktop.muted"
CAMERA = "desktop.camera"
WARNING = "desktop.warning"
CLOSED = "desktop.closed"
RECONNECTING = "desktop.reconnecting"


@dataclass(frozen=True, slots=True)
class Typed:
    """The person sent a typed turn."""

    text: str

    def json(self) -> JsonEvent:
        return {"type": TYPED, "text": self.text}


@dataclass(frozen=True, slots=True)
class Played:
    """A reply's audio has finished playing here."""

    turn_id: int
    played_ms: int

    def json(self) -> JsonEvent:
        return {"type": PLAYED, "turn_id": self.turn_id, "played_ms": self.played_ms}


@dataclass(frozen=True, slots=True)
class Muted:
    muted: bool

    def json(self) -> JsonEvent:
        return {"type": MUTED, "muted": self.muted}


@dataclass(frozen=True, slots=True)
class CameraChanged:
    """The camera went on or off; ``available`` False: there is no camera at all."""

    on: bool
    available: bool = True

    def json(self) -> JsonEvent:
        if not self.available:
            return {"type": CAMERA, "available": False}
        return {"type": CAMERA, "on": self.on}


@dataclass(frozen=True, slots=True)
class AppWarning:
    """Something is missing (a device, the connection for a typed turn); the app goes on
    without it."""

    message: str

    def json(self) -> JsonEvent:
        return {"type": WARNING, "message": self.message}


@dataclass(frozen=True, slots=True)
class Retrying:
    """The session ended (the server restarts, the connection dropped); a new one is tried in
    ``wait_s`` seconds (``message`` says all of it to the person)."""

    message: str
    reason: str
    attempt: int
    tries: int
    wait_s: float

    def json(self) -> JsonEvent:
        return {"type": RECONNECTING, "message": self.message, "reason": self.reason,
                "attempt": self.attempt, "tries": self.tries, "wait_s": self.wait_s}


@dataclass(frozen=True, slots=True)
class Closed:
    """The conversation is over; ``reason`` why, None when the person ended it."""

    reason: str | None

    def json(self) -> JsonEvent:
        return {"type": CLOSED, "reason": self.reason}


AppEvent = Typed | Played | Muted | CameraChanged | AppWarning | Retrying | Closed
DesktopEvent = AppEvent | WireEvent


def _retrying(f: Fields) -> Retrying:
    return Retrying(f.text("message"), f.text("reason", ""), f.maybe_integer("attempt") or 0,
                    f.maybe_integer("tries") or 0, f.number("wait_s") or 0.0)


_DECODERS: dict[str, Callable[[Fields], AppEvent]] = {
    TYPED: lambda f: Typed(f.text("text")),
    PLAYED: lambda f: Played(f.integer("turn_id"), f.integer("played_ms")),
    MUTED: lambda f: Muted(f.flag("muted", False)),
    CAMERA: lambda f: CameraChanged(f.flag("on", False), f.flag("available", True)),
    WARNING: lambda f: AppWarning(f.text("message")),
    RECONNECTING: _retrying,
    CLOSED: lambda f: Closed(f.maybe_text("reason")),
}


def decode_desktop_event(raw: Mapping[str, Any]) -> DesktopEvent:
    """The typed event for one of the app's own events or one of the server's; ``Unknown``
    for one that cannot be read."""
    kind = raw.get("type")
    decode = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decode is None:
        return decode_event(raw)
    try:
        return decode(Fields(raw))
    except Malformed as e:
        return Unknown(str(kind), raw, str(e))


def print_event(ev: JsonEvent) -> None:
    """One JSON line per event on stdout (reply text deltas are left out: reply.done has the
    text); why a connection failed or ended also goes to stderr, as an ``error:`` line."""
    event = decode_desktop_event(ev)
    if not isinstance(event, ReplyText):
        print_json(ev)
    if isinstance(event, Closed) and event.reason:
        print(f"error: {event.reason}", file=sys.stderr, flush=True)
