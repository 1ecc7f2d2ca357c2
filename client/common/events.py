"""The server's events (docs/PROTOCOL.md, "Server → client") as typed values: ``decode_event``
turns a wire event (a JSON object) into one, and clients dispatch on it with ``match``.

The server's own event classes (``streaming.events``) are reused where the wire carries what
they hold; ``Ready`` is the client's view of ``session.ready`` (the wire adds ``resumed`` and
the MQTT ``sequence`` flag, and a client needs no more of it). Anything a client cannot read —
a type from a newer server, or a known type with a field missing or of the wrong kind — comes
back as ``Unknown``, which every client ignores: it never ends a conversation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from streaming.events import (
    Error,
    Metrics,
    ReplyDone,
    ReplyInterrupted,
    ReplyStarted,
    ReplyText,
    Scene,
    SessionClosing,
    SpeechStarted,
    SpeechStopped,
    ToolCallRequested,
    ToolCancelled,
    Transcript,
)

__all__ = [
    "Error", "Fields", "JsonEvent", "Malformed", "Metrics", "Ready", "ReplyDone",
    "ReplyInterrupted", "ReplyStarted", "ReplyText", "Scene", "SessionClosing", "SpeechStarted",
    "SpeechStopped", "ToolCallRequested", "ToolCancelled", "Transcript", "Unknown", "WireEvent",
    "decode_event",
]

JsonEvent = dict[str, Any]  # an event as it travels: one JSON object


@dataclass(frozen=True, slots=True)
class Ready:
    """``session.ready``: the session is open (again, after each accepted ``session.start``).
    ``output_rate``: the reply audio's sample rate (None where the event said none);
    ``output_sequence``: MQTT reply audio carries sequence numbers; ``resumed``: MQTT, the
    server went on with the conversation the device had."""

    session_id: str
    models: Mapping[str, str] = field(default_factory=dict)
    output_rate: int | None = None
    output_sequence: bool = False
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class Unknown:
    """An event this client cannot read: ``problem`` says why (None: a type it does not know,
    from a newer server). ``raw`` is the event as it came."""

    type: str
    raw: Mapping[str, Any] = field(repr=False)
    problem: str | None = None


WireEvent = (
    Ready
    | SpeechStarted
    | SpeechStopped
    | Transcript
    | ReplyStarted
    | ReplyText
    | ReplyDone
    | ReplyInterrupted
    | ToolCallRequested
    | ToolCancelled
    | Metrics
    | Scene
    | SessionClosing
    | Error
    | Unknown
)


class Malformed(ValueError):
    """A field of a known event is missing or of the wrong kind."""


class Fields:
    """Typed reads of one JSON object's fields (an absent field and ``null`` read alike);
    Malformed names the field that is not as expected. Shared by the decoders of the server's
    events and of an app's own events."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw

    def _value(self, name: str, kinds: tuple[type, ...], what: str, required: bool) -> Any:
        value = self.raw.get(name)
        if value is None:
            if required:
                raise Malformed(f"no {name}")
            return None
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise Malformed(f"{name} is not {what}")
        return value

    def integer(self, name: str) -> int:
        value: int = self._value(name, (int,), "an integer", True)
        return value

    def maybe_integer(self, name: str) -> int | None:
        value: int | None = self._value(name, (int,), "an integer", False)
        return value

    def text(self, name: str, default: str | None = None) -> str:
        """A string; ``default`` when absent (required when there is none)."""
        value: str | None = self._value(name, (str,), "a string", default is None)
        if value is None:
            return default or ""
        return value

    def maybe_text(self, name: str) -> str | None:
        value: str | None = self._value(name, (str,), "a string", False)
        return value

    def flag(self, name: str, default: bool) -> bool:
        value: bool | None = self._value(name, (bool,), "true or false", False)
        return default if value is None else value

    def number(self, name: str) -> float | None:
        value: float | None = self._value(name, (int, float), "a number", False)
        return None if value is None else float(value)

    def mapping(self, name: str, *, required: bool = True) -> Mapping[str, Any]:
        """An object; empty when absent and not ``required``."""
        value: Mapping[str, Any] | None = self._value(name, (dict,), "an object", required)
        return {} if value is None else value


def _ready(f: Fields) -> Ready:
    output = Fields(f.mapping("output", required=False))
    models = {str(k): str(v) for k, v in f.mapping("models", required=False).items()}
    return Ready(f.text("session_id", ""), models, output.maybe_integer("sample_rate"),
                 output.flag("sequence", False), f.flag("resumed", False))


def _metrics(f: Fields) -> Metrics:
    stages = f.mapping("stages")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in stages.values()):
        raise Malformed("stages are not numbers")
    return Metrics(f.integer("turn_id"), {str(k): float(v) for k, v in stages.items()})


_DECODERS: dict[str, Callable[[Fields], WireEvent]] = {
    "session.ready": _ready,
    "speech.started": lambda f: SpeechStarted(f.maybe_integer("t_ms") or 0,
                                              f.maybe_integer("turn_id")),
    "speech.stopped": lambda f: SpeechStopped(f.maybe_integer("t_ms") or 0,
                                              f.maybe_integer("turn_id")),
    "transcript": lambda f: Transcript(f.integer("turn_id"), f.text("text"),
                                       f.flag("final", False), f.maybe_text("language"),
                                       f.maybe_integer("audio_ms")),
    "reply.started": lambda f: ReplyStarted(f.integer("turn_id")),
    "reply.text": lambda f: ReplyText(f.integer("turn_id"), f.text("delta")),
    "reply.done": lambda f: ReplyDone(f.integer("turn_id"), f.text("text", "")),
    "reply.interrupted": lambda f: ReplyInterrupted(
        f.integer("turn_id"), round(f.number("played_ms") or 0), f.text("heard_text", "")),
    "tool.call": lambda f: ToolCallRequested(f.integer("turn_id"), f.text("call_id"),
                                             f.text("name"), f.text("arguments", "")),
    "tool.cancelled": lambda f: ToolCancelled(f.integer("turn_id"), f.text("call_id")),
    "metrics": _metrics,
    "scene": lambda f: Scene(f.text("text"), f.maybe_integer("t_ms") or 0,
                             f.text("engine", "")),
    "session.closing": lambda f: SessionClosing(f.text("reason", ""), f.text("message", ""),
                                                f.flag("reconnect", False)),
    "error": lambda f: Error(f.text("code", ""), f.text("message", ""), f.flag("fatal", False),
                             f.number("retry_after"), f.maybe_integer("turn_id")),
}


def decode_event(raw: Mapping[str, Any]) -> WireEvent:
    """The typed event for a wire event; ``Unknown`` for one this client cannot read (never
    an exception: the connection goes on)."""
    kind = raw.get("type")
    decode = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decode is None:
        return Unknown(str(kind), raw)
    try:
        return decode(Fields(raw))
    except Malformed as e:
        return Unknown(str(kind), raw, str(e))
