"""The closed set of events a session emits. Dispatch on them with ``match``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AudioFormat:
    sample_rate: int
    channels: int = 1
    format: str = "pcm_s16le"


@dataclass(frozen=True, slots=True)
class SessionReady:
    session_id: str
    input: AudioFormat
    output: AudioFormat
    models: dict[str, str]


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    t_ms: int  # position in the session's input audio stream
    turn_id: int | None = None  # the turn the utterance will be, if it becomes one


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    t_ms: int
    turn_id: int | None = None


@dataclass(frozen=True, slots=True)
class Transcript:
    turn_id: int
    text: str
    final: bool
    language: str | None = None
    audio_ms: int | None = None  # a partial: the input stream position its audio reaches


@dataclass(frozen=True, slots=True)
class ReplyStarted:
    turn_id: int


@dataclass(frozen=True, slots=True)
class ReplyText:
    turn_id: int
    delta: str


@dataclass(frozen=True, slots=True)
class ReplyDone:
    turn_id: int
    text: str


@dataclass(frozen=True, slots=True)
class ReplyInterrupted:
    """The person interrupted the reply: no more of its audio follows. ``heard_text`` is the
    part of the reply they heard (what the conversation history keeps)."""

    turn_id: int
    played_ms: int
    heard_text: str


@dataclass(frozen=True, slots=True)
class ToolCallRequested:
    """The reply calls a tool the client declared: the client runs it and sends its result
    (the reply ends here; the result starts the next one)."""

    turn_id: int
    call_id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True, slots=True)
class ToolCancelled:
    """A tool call is void (the person spoke, or the reply was interrupted): its result, if it
    comes, is refused and never spoken."""

    turn_id: int
    call_id: str


@dataclass(frozen=True, slots=True)
class Metrics:
    """Stage timings of one turn in ms, measured from the end of the user's speech."""

    turn_id: int
    stages: dict[str, float]


@dataclass(frozen=True, slots=True)
class Scene:
    """What the camera showed, as an observation joined to the visual memory."""

    text: str
    t_ms: int  # ms since the session started
    engine: str


@dataclass(frozen=True, slots=True)
class SessionClosing:
    """The server ends the session on purpose (it is draining for a restart): the client's
    last event. ``reconnect``: connecting again (to the balancer) gets a new session
    elsewhere at once."""

    reason: str
    message: str
    reconnect: bool = True


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    message: str
    fatal: bool = False
    retry_after: float | None = None  # seconds (rate_limited); not sent when None
    turn_id: int | None = None  # the reply it ended, if it ended one


Event = (
    SessionReady
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
)
