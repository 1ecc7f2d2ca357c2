"""The OpenAI Realtime protocol over a WebSocket (``/v1/realtime``): a fourth thin adapter onto
the same session as the native WebSocket, WebRTC and MQTT (docs/REALTIME.md).

This module owns the socket and the client → server side: client events (validated in
streaming/realtime_wire.py) become session calls. The server → client side — session events
become the protocol's server events, with its ids and order — is ``Responses``
(streaming/realtime_responses.py), which the adapter owns. A bad event is answered with an
``error`` event; the socket and the session go on."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal, Protocol

import numpy as np
from aiohttp import WSMsgType, web

from streaming.audio import MODEL_RATE, Float32Array
from streaming.conversation import ReplyOptions, ToolSpec, output_item_id
from streaming.errors import ProtocolError, VoxlensError
from streaming.ports import ClientAudio, SessionPort, pump
from streaming.protocol import InputAudio, OutputAudio, SessionStart, TextTurn
from streaming.ratelimit import MessageLimits
from streaming.realtime_responses import ClientChoices, Responses
from streaming.realtime_wire import (
    BETA_NAMES,
    RATE,
    ClientEvent,
    ResponseConfig,
    SessionConfig,
    TurnDetection,
    check_format,
    decode_audio,
    engine_tool_choice,
    event_id_of,
    parse_client_event,
    required,
    tool_spec,
)

log = logging.getLogger(__name__)
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


class RealtimeAdapter:
    """One Realtime WebSocket ⇄ one session: owns the socket (event ids, one sender at a
    time), the session settings the client chose, the manual input audio buffer and the
    ``Responses`` that speak for the session."""

    def __init__(self, ws: web.WebSocketResponse, session: RealtimePort, *, model: str,
                 beta: bool = False, lead_ms: int = 200, limits: MessageLimits | None = None) -> None:
        self.ws = ws
        self.session = session
        self.model = model
        self.beta = beta  # the client asked for the beta protocol: beta names for the events
        self.limits = limits or MessageLimits()
        self.lead_ms = lead_ms
        self.audio = ClientAudio(session)
        self.audio.start(SessionStart(type="session.start",
                                      audio=InputAudio(sample_rate=RATE, echo_cancellation=True),
                                      output_audio=OutputAudio(sample_rate=RATE)),
                         resumable=False)
        self.choices = ClientChoices()  # server_vad None: the client commits
        self._buffer: list[Float32Array] = []  # input audio for a manual commit (16 kHz)
        self._buffered = 0  # its samples
        self._ids = itertools.count(1)
        self._send_lock = asyncio.Lock()
        self.responses = Responses(session, self.choices, send=self._send, close=self._hang_up,
                                   beta=beta)

    # ---- the socket ---------------------------------------------------------------------

    async def run(self) -> None:
        """Pump both directions until the client leaves. Cancelling stops both pumps; the
        caller closes the session."""
        await self._send({"type": "session.created", "session": self._session_object()})
        await pump(self.session, self._receive, send_event=self.responses.on_event,
                   send_audio=self.responses.send_audio, hang_up=self._hang_up, chunk_ms=CHUNK_MS,
                   lead_ms=self.lead_ms)

    async def _send(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if self.beta:
            event["type"] = BETA_NAMES.get(kind, kind)
        event = {"event_id": f"event_{next(self._ids)}", **event}
        async with self._send_lock:
            await self.ws.send_json(event)

    async def _hang_up(self) -> None:
        await self.ws.close()

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
                item_id = required(event.item_id, "item_id")
                ms = required(event.audio_end_ms, "audio_end_ms")
                self.session.truncate(item_id, ms)
                await self._send({"type": "conversation.item.truncated", "item_id": item_id,
                                  "content_index": event.content_index or 0, "audio_end_ms": ms})
            case "conversation.item.delete":
                item_id = required(event.item_id, "item_id")
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
            self.session.update(tools=[tool_spec(t) for t in s.tools])
        language = None
        for holder, name in ((audio_in, "transcription"), (s, "input_audio_transcription")):
            if holder is not None and name in holder.model_fields_set:
                transcription = getattr(holder, name)
                self.choices.transcription = transcription is not None
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
            options = replace(options, tool_choice=engine_tool_choice(s.tool_choice))
        if s.temperature is not None:
            options = replace(options, temperature=s.temperature)
        limit = s.max_output_tokens or s.max_response_output_tokens
        if limit is not None:
            options = replace(options, max_tokens=None if limit == "inf" else limit)
        self.session.reply_options = options
        self.choices.voice = ((audio_out.voice if audio_out is not None else None) or s.voice
                              or self.choices.voice)

    def _detect(self, vad: TurnDetection | None) -> None:
        self.choices.server_vad = vad
        if vad is None:  # manual: audio waits in the buffer for a commit
            self.session.auto_reply = False
            return
        self._buffer, self._buffered = [], 0
        self.session.auto_reply = vad.create_response
        self.session.detect_turns(threshold=vad.threshold, silence_ms=vad.silence_duration_ms,
                                  prefix_ms=vad.prefix_padding_ms, interrupt=vad.interrupt_response)

    async def _append(self, pcm: bytes) -> None:
        if self.choices.server_vad is not None:
            await self.audio.push(pcm)
            return
        audio = self.audio.converter.convert(pcm)
        if (self._buffered + audio.size) * 1000 // MODEL_RATE > MAX_BUFFER_MS:
            raise ProtocolError(f"the input audio buffer holds at most {MAX_BUFFER_MS // 1000} s; "
                                "commit or clear it", code="input_audio_buffer_full")
        self._buffer.append(audio)
        self._buffered += audio.size

    async def _commit(self, event_id: str | None) -> None:
        if self.choices.server_vad is not None:
            raise ProtocolError("with server VAD the server commits the audio itself; set "
                                "turn_detection to null to commit by hand", code="bad_state")
        if self._buffered * 1000 // MODEL_RATE < MIN_COMMIT_MS:
            raise ProtocolError(f"the input audio buffer holds less than {MIN_COMMIT_MS} ms of "
                                "audio", code="input_audio_buffer_commit_empty")
        audio = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        turn_id = self.session.commit_audio(audio)
        await self.responses.user_audio_added(turn_id, buffer_committed=True)

    async def _create_item(self, event: ClientEvent) -> None:
        item = required(event.item, "item")
        after = event.previous_item_id
        if item.type == "function_call_output":
            call_id = required(item.call_id, "item.call_id")
            self.session.tool_result(call_id, required(item.output, "item.output"), respond=False)
            await self.responses.added({"id": output_item_id(call_id),
                                        "type": "function_call_output", "object": "realtime.item",
                                        "status": "completed", "call_id": call_id,
                                        "output": item.output})
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
            await self.responses.user_audio_added(turn_id, buffer_committed=False)
            return
        text = " ".join(t for t in texts if t).strip()
        if not text:
            raise ProtocolError("the message has no text", code="invalid_value", param="item.content")
        item_id = self.session.add_message(item.role, text, item_id=item.id, after=after)
        part = ({"type": "input_text", "text": text} if item.role == "user" else
                {"type": "output_text", "text": text})
        await self.responses.added({"id": item_id, "type": "message", "object": "realtime.item",
                                    "status": "completed", "role": item.role, "content": [part]},
                                   previous=after)

    def _create_response(self, r: ResponseConfig) -> None:
        if self.responses.busy:
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
            tool_choice=(engine_tool_choice(r.tool_choice) if r.tool_choice is not None else
                         options.tool_choice),
            temperature=r.temperature if r.temperature is not None else options.temperature,
            max_tokens=(None if limit == "inf" else limit) if limit is not None else options.max_tokens)
        turn_id = self.session.respond(options)
        self.responses.requested(turn_id, options)

    def _cancel(self, response_id: str | None) -> None:
        if not self.responses.in_progress(response_id):
            raise ProtocolError("no response is in progress" if response_id is None else
                                f"response {response_id!r} is not in progress",
                                code="response_cancel_not_active")
        self.session.interrupt()

    # ---- objects --------------------------------------------------------------------------

    def _session_object(self) -> dict[str, Any]:
        options = self.session.reply_options
        vad = self.choices.server_vad
        pcm = {"type": "audio/pcm", "rate": RATE}
        return {
            "type": "realtime", "object": "realtime.session",
            "id": f"sess_{self.session.session_id}", "model": self.model,
            "output_modalities": ["audio"] if options.speak else ["text"],
            "instructions": self.session.instructions,
            "audio": {
                "input": {"format": pcm, "noise_reduction": None,
                          "transcription": {"model": "voxlens"} if self.choices.transcription else None,
                          "turn_detection": None if vad is None else {
                              "type": vad.type, "threshold": vad.threshold,
                              "prefix_padding_ms": vad.prefix_padding_ms,
                              "silence_duration_ms": vad.silence_duration_ms,
                              "create_response": vad.create_response,
                              "interrupt_response": vad.interrupt_response}},
                "output": {"format": pcm, "voice": self.choices.voice, "speed": 1.0},
            },
            "tools": [{"type": "function", "name": t.name, "description": t.description,
                       "parameters": dict(t.parameters)} for t in self.session.client_tools],
            "tool_choice": options.tool_choice,
            "max_output_tokens": options.max_tokens or "inf",
        }
