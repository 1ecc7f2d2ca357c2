"""The OpenAI Realtime protocol over a WebSocket (``/v1/realtime``): a fourth thin adapter onto
the same session as the native WebSocket, WebRTC and MQTT (docs/REALTIME.md).

Client events become session calls; session events become the protocol's server events, with
its ids and order: a response's items, their content parts and deltas, then ``response.done``
after the last audio delta. A bad event is answered with an ``error`` event; the socket and
the session go on."""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
from aiohttp import WSMsgType, web

from streaming.audio import MODEL_RATE, Float32Array
from streaming.conversation import (
    ReplyOptions,
    ToolSpec,
    call_item_id,
    output_item_id,
    reply_item_id,
    user_item_id,
)
from streaming.errors import ProtocolError, VoxlensError
from streaming.events import (
    Error,
    Event,
    ReplyDone,
    ReplyInterrupted,
    ReplyStarted,
    ReplyText,
    SessionClosing,
    SpeechStarted,
    SpeechStopped,
    ToolCallRequested,
    Transcript,
)
from streaming.ports import ClientAudio, SessionPort, pump
from streaming.protocol import InputAudio, OutputAudio, SessionStart, TextTurn
from streaming.ratelimit import MessageLimits
from streaming.realtime_wire import (
    BETA_NAMES,
    RATE,
    ClientEvent,
    FunctionTool,
    ResponseConfig,
    SessionConfig,
    ToolChoice,
    TurnDetection,
    check_format,
    decode_audio,
    event_id_of,
    parse_client_event,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK_MS = 40  # reply audio per output_audio.delta
MAX_BUFFER_MS = 60_000  # input audio held for a manual commit
MIN_COMMIT_MS = 100  # OpenAI's service refuses to commit less


class RealtimePort(SessionPort, Protocol):
    """What this adapter needs from a session beyond the other transports' port."""

    auto_reply: bool
    reply_options: ReplyOptions

    @property
    def instructions(self) -> str: ...

    @property
    def client_tools(self) -> Sequence[ToolSpec]: ...

    def update(self, *, instructions: str | None = None, language: str | None = None,
               tools: Sequence[ToolSpec] | None = None) -> None: ...

    def detect_turns(self, *, threshold: float | None, silence_ms: int | None,
                     prefix_ms: int | None, interrupt: bool) -> None: ...

    def add_message(self, kind: Literal["user", "assistant"], text: str, *,
                    item_id: str | None = None, after: str | None = None) -> str: ...

    def delete_item(self, item_id: str) -> None: ...

    def truncate(self, item_id: str, audio_end_ms: int) -> str: ...

    def respond(self, options: ReplyOptions | None = None) -> int: ...

    def commit_audio(self, audio: Float32Array) -> int: ...


@dataclass(slots=True)
class _Response:
    turn_id: int
    speak: bool
    max_tokens: int | None
    outputs: list[dict[str, Any]] = field(default_factory=list)  # its items, in order
    text: str = ""
    message: dict[str, Any] | None = None  # the assistant message item, once begun

    @property
    def id(self) -> str:
        return f"resp_{self.turn_id}"


class RealtimeAdapter:
    def __init__(self, ws: web.WebSocketResponse, session: RealtimePort, *, model: str,
                 beta: bool = False, lead_ms: int = 200, client_buffer_ms: int = 100,
                 limits: MessageLimits | None = None) -> None:
        self.ws = ws
        self.session = session
        self.model = model
        self.beta = beta  # the client asked for the beta protocol: beta names for the events
        self.limits = limits or MessageLimits()
        self.lead_ms = lead_ms
        self.audio = ClientAudio(session, client_buffer_ms=client_buffer_ms)
        self.audio.start(SessionStart(type="session.start",
                                      audio=InputAudio(sample_rate=RATE, echo_cancellation=True),
                                      output_audio=OutputAudio(sample_rate=RATE)),
                         resumable=False)
        self.playout = self.audio.playout
        self.server_vad: TurnDetection | None = TurnDetection()  # None: the client commits
        self.transcription = True  # input transcription events
        self.voice = "default"
        self._buffer: list[Float32Array] = []  # input audio for a manual commit (16 kHz)
        self._buffered = 0  # its samples
        self._responses: dict[int, _Response] = {}  # in progress, by turn id
        self._requested: dict[int, _Response] = {}  # response.create answered, not started
        self._committed: set[int] = set()  # manual commits still transcribing
        self._last_item: str | None = None  # previous_item_id of the next item
        self._ids = itertools.count(1)
        self._send_lock = asyncio.Lock()

    # ---- the socket ---------------------------------------------------------------------

    async def run(self) -> None:
        """Pump both directions until the client leaves. Cancelling stops both pumps; the
        caller closes the session."""
        await self._send({"type": "session.created", "session": self._session_object()})
        await pump(self.session, self.playout, self._receive, send_event=self._on_session_event,
                   send_audio=self._send_audio, hang_up=self._hang_up, chunk_ms=CHUNK_MS,
                   lead_ms=self.lead_ms)

    async def _send(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if self.beta:
            event["type"] = BETA_NAMES.get(kind, kind)
        event = {"event_id": f"event_{next(self._ids)}", **event}
        async with self._send_lock:
            await self.ws.send_json(event)

    async def _receive(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                await self._on_message(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await self._error(ProtocolError("binary messages are not part of the Realtime "
                                                "protocol: send JSON events", code="invalid_event"))
            elif msg.type == WSMsgType.ERROR:
                log.info("websocket error: %s", self.ws.exception())
                return

    async def _on_message(self, raw: str) -> None:
        try:
            await self._on_event(parse_client_event(raw))
        except VoxlensError as e:
            await self._error(e, event_id_of(raw))

    async def _error(self, e: VoxlensError, event_id: str | None = None) -> None:
        kind = "invalid_request_error" if isinstance(e, ProtocolError) else "server_error"
        await self._send({"type": "error", "error": {
            "type": kind, "code": e.code, "message": e.message,
            "param": getattr(e, "param", None), "event_id": event_id}})

    # ---- client events ------------------------------------------------------------------

    async def _on_event(self, event: ClientEvent) -> None:
        match event.type:
            case "session.update":
                self._update(event.session or SessionConfig())
                await self._send({"type": "session.updated", "session": self._session_object()})
            case "input_audio_buffer.append":
                await self._append(decode_audio(event.audio))
            case "input_audio_buffer.commit":
                await self._commit(event.event_id)
            case "input_audio_buffer.clear":
                self._buffer, self._buffered = [], 0
                await self._send({"type": "input_audio_buffer.cleared"})
            case "conversation.item.create":
                await self._create_item(event)
            case "conversation.item.truncate":
                item_id = _required(event.item_id, "item_id")
                ms = _required(event.audio_end_ms, "audio_end_ms")
                self.session.truncate(item_id, ms)
                await self._send({"type": "conversation.item.truncated", "item_id": item_id,
                                  "content_index": event.content_index or 0, "audio_end_ms": ms})
            case "conversation.item.delete":
                item_id = _required(event.item_id, "item_id")
                self.session.delete_item(item_id)
                await self._send({"type": "conversation.item.deleted", "item_id": item_id})
            case "response.create":
                self._create_response(event.response or ResponseConfig())
            case "response.cancel":
                self._cancel(event.response_id)

    def _update(self, s: SessionConfig) -> None:
        audio_in = s.audio.input if s.audio is not None else None
        audio_out = s.audio.output if s.audio is not None else None
        check_format(audio_in.format if audio_in else None)
        check_format(audio_out.format if audio_out else None)
        check_format(s.input_audio_format)
        check_format(s.output_audio_format)
        if s.tools is not None:
            self.session.update(tools=[_spec(t) for t in s.tools])
        language = None
        for holder, name in ((audio_in, "transcription"), (s, "input_audio_transcription")):
            if holder is not None and name in holder.model_fields_set:
                transcription = getattr(holder, name)
                self.transcription = transcription is not None
                language = transcription.language if transcription is not None else None
        self.session.update(instructions=s.instructions, language=language)
        for holder, name in ((audio_in, "turn_detection"), (s, "turn_detection")):
            if holder is not None and name in holder.model_fields_set:
                self._detect(getattr(holder, name))
        options = self.session.reply_options
        modalities = s.output_modalities or s.modalities
        if modalities is not None:
            options = replace(options, speak="audio" in modalities)
        if s.tool_choice is not None:
            options = replace(options, tool_choice=_choice(s.tool_choice))
        if s.temperature is not None:
            options = replace(options, temperature=s.temperature)
        limit = s.max_output_tokens or s.max_response_output_tokens
        if limit is not None:
            options = replace(options, max_tokens=None if limit == "inf" else limit)
        self.session.reply_options = options
        self.voice = (audio_out.voice if audio_out is not None else None) or s.voice or self.voice

    def _detect(self, vad: TurnDetection | None) -> None:
        self.server_vad = vad
        if vad is None:  # manual: audio waits in the buffer for a commit
            self.session.auto_reply = False
            return
        self._buffer, self._buffered = [], 0
        self.session.auto_reply = vad.create_response
        self.session.detect_turns(threshold=vad.threshold, silence_ms=vad.silence_duration_ms,
                                  prefix_ms=vad.prefix_padding_ms, interrupt=vad.interrupt_response)

    async def _append(self, pcm: bytes) -> None:
        if self.server_vad is not None:
            await self.audio.push(pcm)
            return
        audio = self.audio.converter.convert(pcm)
        if (self._buffered + audio.size) * 1000 // MODEL_RATE > MAX_BUFFER_MS:
            raise ProtocolError(f"the input audio buffer holds at most {MAX_BUFFER_MS // 1000} s; "
                                "commit or clear it", code="input_audio_buffer_full")
        self._buffer.append(audio)
        self._buffered += audio.size

    async def _commit(self, event_id: str | None) -> None:
        if self.server_vad is not None:
            raise ProtocolError("with server VAD the server commits the audio itself; set "
                                "turn_detection to null to commit by hand", code="bad_state")
        if self._buffered * 1000 // MODEL_RATE < MIN_COMMIT_MS:
            raise ProtocolError(f"the input audio buffer holds less than {MIN_COMMIT_MS} ms of "
                                "audio", code="input_audio_buffer_commit_empty")
        audio = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        turn_id = self.session.commit_audio(audio)
        self._committed.add(turn_id)
        await self._user_item_added(turn_id, committed=True)

    async def _create_item(self, event: ClientEvent) -> None:
        item = _required(event.item, "item")
        after = event.previous_item_id
        if item.type == "function_call_output":
            call_id = _required(item.call_id, "item.call_id")
            self.session.tool_result(call_id, _required(item.output, "item.output"), respond=False)
            await self._added({"id": output_item_id(call_id), "type": "function_call_output",
                               "object": "realtime.item", "status": "completed",
                               "call_id": call_id, "output": item.output})
            return
        if item.type != "message" or item.role not in ("user", "assistant"):
            raise ProtocolError("only user and assistant messages and function_call_output items "
                                "can be created here", code="unsupported", param="item.type")
        texts = [c.text or c.transcript or "" for c in item.content if c.type != "input_audio"]
        audio = [c.audio for c in item.content if c.type == "input_audio" and c.audio]
        if item.role == "user" and audio and not any(texts):
            self.limits.check(TextTurn(type="text", text="audio"))
            turn_id = self.session.commit_audio(
                self.audio.converter.convert(b"".join(decode_audio(a) for a in audio)))
            self._committed.add(turn_id)
            await self._user_item_added(turn_id, committed=False)
            return
        text = " ".join(t for t in texts if t).strip()
        if not text:
            raise ProtocolError("the message has no text", code="invalid_value", param="item.content")
        item_id = self.session.add_message(item.role, text, item_id=item.id, after=after)
        part = ({"type": "input_text", "text": text} if item.role == "user" else
                {"type": "output_text", "text": text})
        await self._added({"id": item_id, "type": "message", "object": "realtime.item",
                           "status": "completed", "role": item.role, "content": [part]},
                          previous=after)

    def _create_response(self, r: ResponseConfig) -> None:
        if self._responses or self._requested:
            raise ProtocolError("a response is in progress; cancel it or wait for response.done",
                                code="conversation_already_has_active_response")
        self.limits.check(TextTurn(type="text", text="r"))
        options = self.session.reply_options
        modalities = r.output_modalities or r.modalities
        if modalities is not None:
            options = replace(options, speak="audio" in modalities)
        limit = r.max_output_tokens or r.max_response_output_tokens
        options = replace(
            options, instructions=r.instructions or options.instructions,
            tool_choice=_choice(r.tool_choice) if r.tool_choice is not None else options.tool_choice,
            temperature=r.temperature if r.temperature is not None else options.temperature,
            max_tokens=(None if limit == "inf" else limit) if limit is not None else options.max_tokens)
        turn_id = self.session.respond(options)
        self._requested[turn_id] = _Response(turn_id, options.speak, options.max_tokens)

    def _cancel(self, response_id: str | None) -> None:
        active = [r for r in self._responses.values() if response_id in (None, r.id)]
        if not active:
            raise ProtocolError("no response is in progress" if response_id is None else
                                f"response {response_id!r} is not in progress",
                                code="response_cancel_not_active")
        self.session.interrupt()

    # ---- session events -------------------------------------------------------------------

    async def _hang_up(self) -> None:
        await self.ws.close()

    async def _send_audio(self, chunk: bytes) -> None:
        response = self._responses.get(self.playout.last_turn or -1)
        if response is not None:
            message = await self._message(response, "")
            await self._send({"type": "response.output_audio.delta", "response_id": response.id,
                              "item_id": message["id"], "output_index": _index(response, message),
                              "content_index": 0, "delta": base64.b64encode(chunk).decode()})

    async def _on_session_event(self, event: Event) -> None:
        match event:
            case SpeechStarted(t_ms, turn_id) if self.server_vad is not None and turn_id is not None:
                await self._send({"type": "input_audio_buffer.speech_started",
                                  "audio_start_ms": t_ms, "item_id": user_item_id(turn_id)})
            case SpeechStopped(t_ms, turn_id) if self.server_vad is not None and turn_id is not None:
                await self._send({"type": "input_audio_buffer.speech_stopped",
                                  "audio_end_ms": t_ms, "item_id": user_item_id(turn_id)})
            case Transcript(turn_id, text, True):
                await self._transcript(turn_id, text)
            case ReplyStarted(turn_id):
                started = self._requested.pop(turn_id, None) or _Response(
                    turn_id, self.session.reply_options.speak, self.session.reply_options.max_tokens)
                self._responses[turn_id] = started
                await self._send({"type": "response.created",
                                  "response": self._response_object(started, "in_progress")})
            case ReplyText(turn_id, delta) if turn_id in self._responses:
                current = self._responses[turn_id]
                message = await self._message(current, delta)
                kind = ("response.output_audio_transcript.delta" if current.speak else
                        "response.output_text.delta")
                await self._send({"type": kind, "response_id": current.id, "item_id": message["id"],
                                  "output_index": _index(current, message), "content_index": 0,
                                  "delta": delta})
            case ToolCallRequested(turn_id, call_id, name, arguments) if turn_id in self._responses:
                await self._function_call(self._responses[turn_id], call_id, name, arguments)
            case ReplyDone(turn_id) if turn_id in self._responses:
                await self._finish(self._responses.pop(turn_id), "completed")
            case ReplyInterrupted(turn_id, played_ms):
                response = self._responses.pop(turn_id) if turn_id in self._responses else None
                if response is None or response.speak:
                    await self._send({"type": "conversation.item.truncated", "content_index": 0,
                                      "item_id": reply_item_id(turn_id), "audio_end_ms": played_ms})
                if response is not None:
                    await self._finish(response, "cancelled")
            case SessionClosing(reason, message):
                await self._send({"type": "error", "error": {
                    "type": "server_error", "code": "session_closing", "message":
                    f"{message} ({reason})", "param": None, "event_id": None}})
                await self.ws.close()
            case Error(code, message, fatal, _, turn_id):
                response = (self._responses.pop(turn_id)
                            if turn_id is not None and turn_id in self._responses else None)
                if response is not None:
                    await self._finish(response, "failed")
                await self._send({"type": "error", "error": {
                    "type": "server_error" if code in ("internal", "engine_failed") else
                    "invalid_request_error", "code": code, "message": message, "param": None,
                    "event_id": None}})
                if fatal:
                    await self.ws.close()

    async def _transcript(self, turn_id: int, text: str) -> None:
        item_id = user_item_id(turn_id)
        if turn_id in self._committed:
            self._committed.discard(turn_id)  # its item was added at the commit
        else:
            await self._user_item_added(turn_id, committed=True)
        if not self.transcription:
            return
        if text:
            await self._send({"type": "conversation.item.input_audio_transcription.delta",
                              "item_id": item_id, "content_index": 0, "delta": text})
        await self._send({"type": "conversation.item.input_audio_transcription.completed",
                          "item_id": item_id, "content_index": 0, "transcript": text})

    async def _user_item_added(self, turn_id: int, *, committed: bool) -> None:
        item_id = user_item_id(turn_id)
        if committed:
            await self._send({"type": "input_audio_buffer.committed", "item_id": item_id,
                              "previous_item_id": self._last_item})
        await self._added({"id": item_id, "type": "message", "object": "realtime.item",
                           "status": "completed", "role": "user",
                           "content": [{"type": "input_audio", "transcript": None}]})

    async def _added(self, item: dict[str, Any], *, previous: str | None = None) -> None:
        previous = previous if previous is not None else self._last_item
        await self._send({"type": "conversation.item.added", "previous_item_id": previous,
                          "item": item})
        if not self.beta and item.get("status") == "completed":
            await self._send({"type": "conversation.item.done", "previous_item_id": previous,
                              "item": item})
        self._last_item = item["id"]

    async def _message(self, response: _Response, delta: str) -> dict[str, Any]:
        """The response's assistant message item, begun on its first text or audio."""
        response.text += delta
        if response.message is not None:
            return response.message
        kind = "output_audio" if response.speak else "output_text"
        message: dict[str, Any] = {"id": reply_item_id(response.turn_id), "type": "message",
                                   "object": "realtime.item", "status": "in_progress",
                                   "role": "assistant", "content": []}
        response.message = message
        response.outputs.append(message)
        await self._send({"type": "response.output_item.added", "response_id": response.id,
                          "output_index": _index(response, message), "item": message})
        await self._added(message)
        part = {"type": "audio", "transcript": ""} if response.speak else {"type": "text", "text": ""}
        await self._send({"type": "response.content_part.added", "response_id": response.id,
                          "item_id": message["id"], "output_index": _index(response, message),
                          "content_index": 0, "part": part})
        message["content"] = [{"type": kind}]
        return message

    async def _function_call(self, response: _Response, call_id: str, name: str,
                             arguments: str) -> None:
        item: dict[str, Any] = {"id": call_item_id(call_id), "type": "function_call",
                                "object": "realtime.item", "status": "in_progress",
                                "call_id": call_id, "name": name, "arguments": ""}
        response.outputs.append(item)
        index = _index(response, item)
        await self._send({"type": "response.output_item.added", "response_id": response.id,
                          "output_index": index, "item": item})
        await self._added(item)
        common = {"response_id": response.id, "item_id": item["id"], "output_index": index,
                  "call_id": call_id}
        await self._send({"type": "response.function_call_arguments.delta", **common,
                          "delta": arguments})
        await self._send({"type": "response.function_call_arguments.done", **common,
                          "name": name, "arguments": arguments})
        item.update(status="completed", arguments=arguments)
        await self._send({"type": "response.output_item.done", "response_id": response.id,
                          "output_index": index, "item": item})
        await self._send({"type": "conversation.item.done", "item": item})

    async def _finish(self, response: _Response, status: str) -> None:
        message = response.message
        if message is not None:
            common = {"response_id": response.id, "item_id": message["id"],
                      "output_index": _index(response, message), "content_index": 0}
            text = response.text
            if response.speak:
                await self._send({"type": "response.output_audio.done", **common})
                await self._send({"type": "response.output_audio_transcript.done", **common,
                                  "transcript": text})
                part = {"type": "audio", "transcript": text}
            else:
                await self._send({"type": "response.output_text.done", **common, "text": text})
                part = {"type": "text", "text": text}
            await self._send({"type": "response.content_part.done", **common, "part": part})
            content = ({"type": "output_audio", "transcript": text} if response.speak else
                       {"type": "output_text", "text": text})
            message.update(status="completed" if status == "completed" else "incomplete",
                           content=[content])
            await self._send({"type": "response.output_item.done", "response_id": response.id,
                              "output_index": common["output_index"], "item": message})
            await self._send({"type": "conversation.item.done", "item": message})
        await self._send({"type": "response.done", "response": self._response_object(response,
                                                                                        status)})

    # ---- objects --------------------------------------------------------------------------

    def _session_object(self) -> dict[str, Any]:
        options = self.session.reply_options
        vad = self.server_vad
        pcm = {"type": "audio/pcm", "rate": RATE}
        return {
            "type": "realtime", "object": "realtime.session",
            "id": f"sess_{self.session.session_id}", "model": self.model,
            "output_modalities": ["audio"] if options.speak else ["text"],
            "instructions": self.session.instructions,
            "audio": {
                "input": {"format": pcm, "noise_reduction": None,
                          "transcription": {"model": "voxlens"} if self.transcription else None,
                          "turn_detection": None if vad is None else {
                              "type": vad.type, "threshold": vad.threshold,
                              "prefix_padding_ms": vad.prefix_padding_ms,
                              "silence_duration_ms": vad.silence_duration_ms,
                              "create_response": vad.create_response,
                              "interrupt_response": vad.interrupt_response}},
                "output": {"format": pcm, "voice": self.voice, "speed": 1.0},
            },
            "tools": [{"type": "function", "name": t.name, "description": t.description,
                       "parameters": dict(t.parameters)} for t in self.session.client_tools],
            "tool_choice": options.tool_choice,
            "max_output_tokens": options.max_tokens or "inf",
        }

    def _response_object(self, response: _Response, status: str) -> dict[str, Any]:
        details: dict[str, Any] | None = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": "turn_detected"}
        elif status == "failed":
            details = {"type": "failed", "error": {"type": "server_error", "code": "engine_failed"}}
        return {"id": response.id, "object": "realtime.response", "status": status,
                "status_details": details, "output": response.outputs,
                "conversation_id": f"conv_{self.session.session_id}",
                "output_modalities": ["audio"] if response.speak else ["text"],
                "max_output_tokens": response.max_tokens or "inf",
                "audio": {"output": {"format": {"type": "audio/pcm", "rate": RATE},
                                     "voice": self.voice}},
                "usage": None, "metadata": None}


def _index(response: _Response, item: dict[str, Any]) -> int:
    return next(i for i, o in enumerate(response.outputs) if o is item)


def _spec(tool: FunctionTool) -> ToolSpec:
    return ToolSpec(tool.name, tool.description, tool.parameters)


def _choice(choice: ToolChoice) -> str:
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


def _required(value: T | None, param: str) -> T:
    if value is None:
        raise ProtocolError(f"{param} is required", code="missing_required_parameter", param=param)
    return value

