"""The client/server wire protocol (docs/PROTOCOL.md): client message validation and event encoding."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from streaming.audio import check_rate
from streaming.errors import ProtocolError
from streaming.events import (
    AudioFormat,
    Error,
    Event,
    Metrics,
    ReplyDone,
    ReplyInterrupted,
    ReplyStarted,
    ReplyText,
    Scene,
    SessionClosing,
    SessionReady,
    SpeechStarted,
    SpeechStopped,
    ToolCallRequested,
    ToolCancelled,
    Transcript,
)

MAX_TEXT_MESSAGE_BYTES = 64 * 1024  # every text message but `image`
MAX_IMAGE_MESSAGE_BYTES = 12 * 1024 * 1024
MAX_AUDIO_MESSAGE_BYTES = 256 * 1024  # > 1 s of 48 kHz stereo s16le
MAX_USER_TEXT_CHARS = 4000
MAX_PLAYED_MS = 2**31 - 1  # `playback`: ~24 days of reply audio
# json.loads raises these beyond JSONDecodeError: RecursionError for deep nesting ([[[[…),
# ValueError for an integer of more than 4300 digits (sys.get_int_max_str_digits)
UNUSABLE_JSON = "{} is not usable JSON: nested too deeply or a number too long"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputAudio(_Message):
    sample_rate: int = 16_000
    channels: int = Field(default=1, ge=1, le=2)
    format: Literal["pcm_s16le"] = "pcm_s16le"
    # the client cancels its own echo (browsers do); if not, the server removes it
    echo_cancellation: bool = False
    # MQTT only: each audio/in message starts with a uint32 sequence number (streaming/mqtt.py)
    sequence: bool = False


class OutputAudio(_Message):
    sample_rate: int = 24_000
    format: Literal["pcm_s16le"] = "pcm_s16le"
    sequence: bool = False  # MQTT only: the same header on audio/out messages


MAX_TOOLS = 32
MAX_TOOL_OUTPUT_CHARS = 16_000


class Tool(BaseModel):
    """A function the client runs for the assistant (the OpenAI function tool shape)."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # "type", "strict": not used here
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = Field(default="", max_length=1024)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class SessionStart(_Message):
    type: Literal["session.start"]
    audio: InputAudio = InputAudio()
    output_audio: OutputAudio = OutputAudio()
    language: str | None = Field(default=None, min_length=2, max_length=8)
    instructions: str | None = Field(default=None, max_length=4000)
    tools: list[Tool] = Field(default_factory=list, max_length=MAX_TOOLS)


class ToolResult(_Message):
    """The result of a ``tool.call``: the assistant goes on with it."""

    type: Literal["tool.result"]
    call_id: str = Field(min_length=1, max_length=64)
    output: str = Field(max_length=MAX_TOOL_OUTPUT_CHARS)


class TextTurn(_Message):
    type: Literal["text"]
    text: str = Field(min_length=1, max_length=MAX_USER_TEXT_CHARS)


class ImageFrame(_Message):
    type: Literal["image"]
    data: str = Field(min_length=1)


class Playback(_Message):
    """How much of a reply's audio the client has played out (its speaker position)."""

    type: Literal["playback"]
    # bounded: JSON integers have no limit, and a float holds at most 1.8e308 (the session
    # compares the report with the milliseconds it sent: float(10**309) raised OverflowError)
    played_ms: int = Field(ge=0, le=MAX_PLAYED_MS)
    turn_id: int | None = None  # default: the reply playing now


class Interrupt(_Message):
    type: Literal["interrupt"]


class SessionEnd(_Message):
    type: Literal["session.end"]


MAX_OFFER_BYTES = 128 * 1024


class Offer(_Message):
    """``POST /offer`` body: an SDP offer, plus what ``session.start`` would say."""

    sdp: str = Field(min_length=1, max_length=MAX_OFFER_BYTES)
    type: Literal["offer"]
    language: str | None = Field(default=None, min_length=2, max_length=8)
    instructions: str | None = Field(default=None, max_length=4000)
    echo_cancellation: bool = True  # browsers cancel echo in getUserMedia


def parse_offer(raw: bytes) -> Offer:
    """Validate a signalling request body; raises ProtocolError with a clear message."""
    if len(raw) > MAX_OFFER_BYTES:
        raise ProtocolError(f"offer of {len(raw)} bytes exceeds the {MAX_OFFER_BYTES}-byte limit",
                            code="too_large")
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"offer is not valid JSON: {e}") from e
    except (ValueError, RecursionError) as e:
        raise ProtocolError(UNUSABLE_JSON.format("offer")) from e
    if not isinstance(obj, dict):
        raise ProtocolError('offer must be a JSON object {"sdp": ..., "type": "offer"}')
    try:
        return Offer.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "offer"
        raise ProtocolError(f"invalid offer: {where}: {first['msg']}") from e


ClientMessage = Annotated[
    SessionStart | TextTurn | ImageFrame | Playback | Interrupt | ToolResult | SessionEnd,
    Field(discriminator="type"),
]
_client_message: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
CLIENT_TYPES = ("session.start", "text", "image", "playback", "interrupt", "tool.result",
                "session.end")


def parse_client_message(raw: str) -> ClientMessage:
    """Validate one client text message; raises ProtocolError with a clear message."""
    limit = MAX_IMAGE_MESSAGE_BYTES if '"image"' in raw[:200] else MAX_TEXT_MESSAGE_BYTES
    if len(raw) > limit:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds the {limit}-byte limit",
                            code="too_large")
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"message is not valid JSON: {e.msg}") from e
    except (ValueError, RecursionError) as e:
        raise ProtocolError(UNUSABLE_JSON.format("message")) from e
    if not isinstance(obj, dict):
        raise ProtocolError("message must be a JSON object with a \"type\"")
    kind = obj.get("type")
    if kind not in CLIENT_TYPES:
        raise ProtocolError(
            f"unknown message type {kind!r}; expected one of {', '.join(CLIENT_TYPES)}",
            code="unknown_type",
        )
    try:
        msg = _client_message.validate_python(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "message"
        raise ProtocolError(f"invalid {kind} message: {where}: {first['msg']}") from e
    if isinstance(msg, SessionStart):
        check_rate(msg.audio.sample_rate)
        check_rate(msg.output_audio.sample_rate)
    return msg


def _fmt(f: AudioFormat) -> dict[str, Any]:
    return {"sample_rate": f.sample_rate, "channels": f.channels, "format": f.format}


def event_to_json(event: Event) -> dict[str, Any]:
    """The JSON object of an event (reply audio is no event: it leaves through the playout)."""
    match event:
        case SessionReady(session_id, input_fmt, output_fmt, models):
            return {"type": "session.ready", "session_id": session_id, "input": _fmt(input_fmt),
                    "output": _fmt(output_fmt), "models": models}
        case SpeechStarted(t_ms):
            return {"type": "speech.started", "t_ms": t_ms}
        case SpeechStopped(t_ms):
            return {"type": "speech.stopped", "t_ms": t_ms}
        case ToolCallRequested(turn_id, call_id, name, arguments):
            return {"type": "tool.call", "turn_id": turn_id, "call_id": call_id, "name": name,
                    "arguments": arguments}
        case ToolCancelled(turn_id, call_id):
            return {"type": "tool.cancelled", "turn_id": turn_id, "call_id": call_id}
        case Transcript(turn_id, text, final, language, audio_ms):
            out = {"type": "transcript", "turn_id": turn_id, "text": text, "final": final,
                   "language": language}
            if audio_ms is not None:
                out["audio_ms"] = audio_ms
            return out
        case ReplyStarted(turn_id):
            return {"type": "reply.started", "turn_id": turn_id}
        case ReplyText(turn_id, delta):
            return {"type": "reply.text", "turn_id": turn_id, "delta": delta}
        case ReplyDone(turn_id, text):
            return {"type": "reply.done", "turn_id": turn_id, "text": text}
        case ReplyInterrupted(turn_id, played_ms, heard_text):
            return {"type": "reply.interrupted", "turn_id": turn_id, "played_ms": played_ms,
                    "heard_text": heard_text}
        case Metrics(turn_id, stages):
            return {"type": "metrics", "turn_id": turn_id,
                    "stages": {k: round(v, 1) for k, v in stages.items()}}
        case SessionClosing(reason, message, reconnect):
            return {"type": "session.closing", "reason": reason, "message": message,
                    "reconnect": reconnect}
        case Scene(text, t_ms, engine):
            return {"type": "scene", "text": text, "t_ms": t_ms, "engine": engine}
        case Error(code, message, fatal, retry_after, turn_id):
            error: dict[str, Any] = {"type": "error", "code": code, "message": message, "fatal": fatal}
            if retry_after is not None:
                error["retry_after"] = round(retry_after, 1)
            if turn_id is not None:
                error["turn_id"] = turn_id
            return error


def encode_event(event: Event) -> str:
    """Wire form of an event: JSON text."""
    return json.dumps(event_to_json(event), ensure_ascii=False)
