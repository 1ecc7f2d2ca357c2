"""The OpenAI Realtime protocol's client events, validated (docs/REALTIME.md).

The current (GA) shapes, with the older beta names and flat fields accepted where they
differ. Unknown fields are ignored (clients send what OpenAI's service knows); the fields
voxlens uses are checked, and a bad one is a ``ProtocolError`` naming it. ``tool_spec``,
``engine_tool_choice`` and ``required`` turn checked values into what the session takes."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streaming.conversation import ToolSpec
from streaming.errors import ProtocolError
from streaming.protocol import MAX_TOOL_OUTPUT_CHARS, MAX_TOOLS, MAX_USER_TEXT_CHARS, UNUSABLE_JSON

MAX_EVENT_BYTES = 4 * 1024 * 1024  # an append of ~1.5 s of 24 kHz audio in base64 is 100 KB
MAX_APPEND_BYTES = 1024 * 1024  # decoded PCM of one input_audio_buffer.append (~21 s)
RATE = 24_000  # audio/pcm: 24 kHz mono s16le, both ways
T = TypeVar("T")
BETA_NAMES = {  # GA name → the beta name of the same server event
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "conversation.item.added": "conversation.item.created",
}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class AudioFormat(_Lenient):
    type: str = "audio/pcm"
    rate: int = RATE


class TurnDetection(_Lenient):
    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(default=None, ge=0, le=2000)
    silence_duration_ms: int | None = Field(default=None, ge=100, le=5000)
    create_response: bool = True
    interrupt_response: bool = True


class Transcription(_Lenient):
    model: str | None = None
    language: str | None = Field(default=None, min_length=2, max_length=8)


class AudioInput(_Lenient):
    format: AudioFormat | None = None
    transcription: Transcription | None = None
    turn_detection: TurnDetection | None = None


class AudioOutput(_Lenient):
    format: AudioFormat | None = None
    voice: str | None = None


class Audio(_Lenient):
    input: AudioInput | None = None
    output: AudioOutput | None = None


class FunctionTool(_Lenient):
    type: Literal["function"] = "function"
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = Field(default="", max_length=1024)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


ToolChoice = str | dict[str, Any]


class SessionConfig(_Lenient):
    """``session.update``'s ``session`` (GA), or the beta's flat fields."""

    type: str | None = None
    instructions: str | None = Field(default=None, max_length=16_000)
    output_modalities: list[Literal["text", "audio"]] | None = None
    modalities: list[Literal["text", "audio"]] | None = None  # beta
    audio: Audio | None = None
    input_audio_format: str | None = None  # beta: "pcm16"
    output_audio_format: str | None = None  # beta
    input_audio_transcription: Transcription | None = None  # beta
    turn_detection: TurnDetection | None = None  # beta (null: manual)
    voice: str | None = None  # beta
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_output_tokens: int | Literal["inf"] | None = None
    max_response_output_tokens: int | Literal["inf"] | None = None  # beta


class ResponseConfig(_Lenient):
    """``response.create``'s ``response``: overrides for one response."""

    instructions: str | None = Field(default=None, max_length=16_000)
    output_modalities: list[Literal["text", "audio"]] | None = None
    modalities: list[Literal["text", "audio"]] | None = None  # beta
    tool_choice: ToolChoice | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_output_tokens: int | Literal["inf"] | None = None
    max_response_output_tokens: int | Literal["inf"] | None = None  # beta
    conversation: str | None = None  # "auto" (default) or "none"


class Content(_Lenient):
    type: Literal["input_text", "input_audio", "text", "output_text", "audio", "output_audio"]
    text: str | None = Field(default=None, max_length=MAX_USER_TEXT_CHARS)
    audio: str | None = None  # base64 PCM (input_audio)
    transcript: str | None = Field(default=None, max_length=MAX_USER_TEXT_CHARS)


class Item(_Lenient):
    id: str | None = Field(default=None, min_length=1, max_length=64)
    type: Literal["message", "function_call_output", "function_call"]
    role: Literal["user", "assistant", "system"] | None = None
    content: list[Content] = Field(default_factory=list, max_length=16)
    call_id: str | None = Field(default=None, max_length=64)
    output: str | None = Field(default=None, max_length=MAX_TOOL_OUTPUT_CHARS)


class ClientEvent(_Lenient):
    type: str
    event_id: str | None = Field(default=None, max_length=64)
    session: SessionConfig | None = None  # session.update
    audio: str | None = None  # input_audio_buffer.append
    item: Item | None = None  # conversation.item.create
    previous_item_id: str | None = Field(default=None, max_length=64)
    item_id: str | None = Field(default=None, max_length=64)  # truncate, delete
    content_index: int | None = Field(default=None, ge=0)
    audio_end_ms: int | None = Field(default=None, ge=0, le=2**31 - 1)
    response: ResponseConfig | None = None  # response.create
    response_id: str | None = Field(default=None, max_length=64)  # response.cancel


CLIENT_EVENTS = (
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
    "input_audio_buffer.clear", "conversation.item.create", "conversation.item.truncate",
    "conversation.item.delete", "response.create", "response.cancel",
)


def parse_client_event(raw: str | bytes) -> ClientEvent:
    """One client event; raises ProtocolError for malformed JSON, an unknown type or a bad
    field (``event_id_of`` reads the rejected event's id for the error event)."""
    if len(raw) > MAX_EVENT_BYTES:
        raise ProtocolError(f"event of {len(raw)} bytes exceeds the {MAX_EVENT_BYTES}-byte limit",
                            code="too_large")
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"event is not valid JSON: {e}", code="invalid_json") from e
    except (ValueError, RecursionError) as e:
        raise ProtocolError(UNUSABLE_JSON.format("event"), code="invalid_json") from e
    if not isinstance(obj, dict):
        raise ProtocolError('an event must be a JSON object with a "type"', code="invalid_event")
    kind = obj.get("type")
    if kind not in CLIENT_EVENTS:
        raise ProtocolError(f"unknown or unsupported event type {str(kind)[:60]!r}; this server "
                            f"handles {', '.join(CLIENT_EVENTS)}", code="unknown_event")
    try:
        return ClientEvent.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "event"
        raise ProtocolError(f"invalid {kind} event: {where}: {first['msg']}",
                            code="invalid_value", param=where) from e


def event_id_of(raw: str | bytes) -> str | None:
    """The client's ``event_id`` of a rejected event, if it can be read at all."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    value = obj.get("event_id") if isinstance(obj, dict) else None
    return value[:64] if isinstance(value, str) else None


def decode_audio(data: str | None, *, limit: int = MAX_APPEND_BYTES) -> bytes:
    """Base64 PCM16 → bytes, checked: valid base64, whole samples, within ``limit``."""
    if not data:
        raise ProtocolError("audio is missing or empty", code="invalid_value", param="audio")
    if len(data) > limit * 4 // 3 + 4:
        raise ProtocolError(f"audio of more than {limit} bytes in one event; send smaller "
                            "appends", code="too_large", param="audio")
    try:
        pcm = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError("audio is not valid base64", code="invalid_value", param="audio") from e
    if len(pcm) % 2:
        raise ProtocolError("audio is not whole 16-bit samples (audio/pcm is s16le mono at 24 kHz)",
                            code="bad_audio", param="audio")
    return pcm


def check_format(fmt: AudioFormat | str | None) -> None:
    """Only 24 kHz PCM16 (``audio/pcm``, beta ``pcm16``) is spoken here."""
    if fmt is None:
        return
    if isinstance(fmt, str):
        if fmt != "pcm16":
            raise ProtocolError(f"audio format {fmt[:40]!r} is not supported; use pcm16",
                                code="unsupported", param="audio_format")
        return
    if fmt.type != "audio/pcm" or fmt.rate != RATE:
        raise ProtocolError(f"audio format {fmt.type[:40]} at {fmt.rate} Hz is not supported; use "
                            "audio/pcm at 24000 Hz", code="unsupported", param="format")


def tool_spec(tool: FunctionTool) -> ToolSpec:
    return ToolSpec(tool.name, tool.description, tool.parameters)


def engine_tool_choice(choice: ToolChoice) -> str:
    """A tool_choice as the LLM engines take it: a mode, or a function's name."""
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ProtocolError(f"tool_choice {choice[:40]!r} is not auto, none or required",
                                code="invalid_value", param="tool_choice")
        return choice
    name = choice.get("name") or (choice.get("function") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError("tool_choice names no function", code="invalid_value",
                            param="tool_choice")
    return name


def required(value: T | None, param: str) -> T:
    """A field the event needs (``missing_required_parameter`` when it is absent)."""
    if value is None:
        raise ProtocolError(f"{param} is required", code="missing_required_parameter", param=param)
    return value
