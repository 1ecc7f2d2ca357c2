"""The server → client side of one OpenAI Realtime connection (docs/REALTIME.md): the session's
events become the protocol's server events, with its ids and order — a user's item and its
transcript; a response's items, their content parts and deltas, then ``response.done`` after
the last audio delta. ``RealtimeAdapter`` (streaming/realtime.py) owns one ``Responses`` and
tells it what the client did that adds to the conversation."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from streaming.conversation import ReplyOptions, call_item_id, reply_item_id, user_item_id
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
from streaming.playout import Playout
from streaming.realtime_wire import RATE, TurnDetection

Send = Callable[[dict[str, Any]], Awaitable[None]]


class ReplySource(Protocol):
    """What the server → client side reads from the session."""

    session_id: str
    reply_options: ReplyOptions
    playout: Playout


@dataclass(slots=True)
class ClientChoices:
    """What the client chose with ``session.update`` that the adapter keeps itself (the rest
    goes to the session): the adapter writes it, both sides read it."""

    server_vad: TurnDetection | None = field(default_factory=TurnDetection)  # None: manual
    transcription: bool = True  # input transcription events
    voice: str = "default"


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


class Responses:
    """Owns what the client has been told of the conversation: the responses requested and in
    progress, the user audio items still waiting for their transcript, and the last item (the
    next one's ``previous_item_id``). ``send`` numbers and sends one server event; ``close``
    ends the connection (the session closing, a fatal error)."""

    def __init__(self, session: ReplySource, choices: ClientChoices, *, send: Send,
                 close: Callable[[], Awaitable[None]], beta: bool) -> None:
        self._session = session
        self._choices = choices
        self._send = send
        self._close = close
        self._beta = beta  # beta clients get no conversation.item.done for added items
        self._responses: dict[int, _Response] = {}  # in progress, by turn id
        self._requested: dict[int, _Response] = {}  # response.create answered, not started
        self._committed: set[int] = set()  # user audio items still transcribing
        self._last_item: str | None = None  # previous_item_id of the next item

    # ---- what the adapter asks ------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A response is requested or in progress."""
        return bool(self._responses or self._requested)

    def in_progress(self, response_id: str | None) -> bool:
        """That response (None: any) is in progress."""
        return any(response_id in (None, r.id) for r in self._responses.values())

    def requested(self, turn_id: int, options: ReplyOptions) -> None:
        """``response.create`` started turn ``turn_id`` with these options."""
        self._requested[turn_id] = _Response(turn_id, options.speak, options.max_tokens)

    async def user_audio_added(self, turn_id: int, *, buffer_committed: bool) -> None:
        """The client's audio became user turn ``turn_id`` (its transcript follows): from the
        input buffer's commit, or from a created item."""
        self._committed.add(turn_id)
        await self._user_item_added(turn_id, committed=buffer_committed)

    # ---- session output -------------------------------------------------------------------

    async def send_audio(self, chunk: bytes) -> None:
        """One paced chunk of reply audio, as a delta of the response whose audio it is."""
        response = self._responses.get(self._session.playout.last_turn or -1)
        if response is not None:
            message = await self._message(response, "")
            await self._send({"type": "response.output_audio.delta", "response_id": response.id,
                              "item_id": message["id"], "output_index": _index(response, message),
                              "content_index": 0, "delta": base64.b64encode(chunk).decode()})

    async def on_event(self, event: Event) -> None:
        """One session event, as the Realtime events it means (none for most)."""
        match event:
            case SpeechStarted(t_ms, turn_id) if self._vad and turn_id is not None:
                await self._send({"type": "input_audio_buffer.speech_started",
                                  "audio_start_ms": t_ms, "item_id": user_item_id(turn_id)})
            case SpeechStopped(t_ms, turn_id) if self._vad and turn_id is not None:
                await self._send({"type": "input_audio_buffer.speech_stopped",
                                  "audio_end_ms": t_ms, "item_id": user_item_id(turn_id)})
            case Transcript(turn_id, text, True):
                await self._transcript(turn_id, text)
            case ReplyStarted(turn_id):
                await self._started(turn_id)
            case ReplyText(turn_id, delta) if turn_id in self._responses:
                await self._text(self._responses[turn_id], delta)
            case ToolCallRequested(turn_id, call_id, name, arguments) if turn_id in self._responses:
                await self._function_call(self._responses[turn_id], call_id, name, arguments)
            case ReplyDone(turn_id) if turn_id in self._responses:
                await self._finish(self._responses.pop(turn_id), "completed")
            case ReplyInterrupted(turn_id, played_ms):
                await self._interrupted(turn_id, played_ms)
            case SessionClosing(reason, message):
                await self._send({"type": "error", "error": {
                    "type": "server_error", "code": "session_closing", "message":
                    f"{message} ({reason})", "param": None, "event_id": None}})
                await self._close()
            case Error(code, message, fatal, _, turn_id):
                await self._failed(turn_id, code, message, fatal=fatal)

    @property
    def _vad(self) -> bool:
        return self._choices.server_vad is not None

    async def _started(self, turn_id: int) -> None:
        options = self._session.reply_options
        started = self._requested.pop(turn_id, None) or _Response(
            turn_id, options.speak, options.max_tokens)
        self._responses[turn_id] = started
        await self._send({"type": "response.created",
                          "response": self._response_object(started, "in_progress")})

    async def _text(self, response: _Response, delta: str) -> None:
        message = await self._message(response, delta)
        kind = ("response.output_audio_transcript.delta" if response.speak else
                "response.output_text.delta")
        await self._send({"type": kind, "response_id": response.id, "item_id": message["id"],
                          "output_index": _index(response, message), "content_index": 0,
                          "delta": delta})

    async def _interrupted(self, turn_id: int, played_ms: int) -> None:
        response = self._responses.pop(turn_id) if turn_id in self._responses else None
        if response is None or response.speak:
            await self._send({"type": "conversation.item.truncated", "content_index": 0,
                              "item_id": reply_item_id(turn_id), "audio_end_ms": played_ms})
        if response is not None:
            await self._finish(response, "cancelled")

    async def _failed(self, turn_id: int | None, code: str, message: str, *, fatal: bool) -> None:
        response = (self._responses.pop(turn_id)
                    if turn_id is not None and turn_id in self._responses else None)
        if response is not None:
            await self._finish(response, "failed")
        await self._send({"type": "error", "error": {
            "type": "server_error" if code in ("internal", "engine_failed") else
            "invalid_request_error", "code": code, "message": message, "param": None,
            "event_id": None}})
        if fatal:
            await self._close()

    # ---- items ----------------------------------------------------------------------------

    async def _transcript(self, turn_id: int, text: str) -> None:
        item_id = user_item_id(turn_id)
        if turn_id in self._committed:
            self._committed.discard(turn_id)  # its item was added at the commit
        else:
            await self._user_item_added(turn_id, committed=True)
        if not self._choices.transcription:
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
        await self.added({"id": item_id, "type": "message", "object": "realtime.item",
                           "status": "completed", "role": "user",
                           "content": [{"type": "input_audio", "transcript": None}]})

    async def added(self, item: dict[str, Any], *, previous: str | None = None) -> None:
        """An item joins the conversation (the client's, or one of a response); ``previous``:
        where the client placed it (None: after the last)."""
        previous = previous if previous is not None else self._last_item
        await self._send({"type": "conversation.item.added", "previous_item_id": previous,
                          "item": item})
        if not self._beta and item.get("status") == "completed":
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
        await self.added(message)
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
        await self.added(item)
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

    # ---- the end of a response ------------------------------------------------------------

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

    def _response_object(self, response: _Response, status: str) -> dict[str, Any]:
        """The protocol's ``realtime.response`` object of a response with that status."""
        details: dict[str, Any] | None = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": "turn_detected"}
        elif status == "failed":
            details = {"type": "failed", "error": {"type": "server_error", "code": "engine_failed"}}
        return {"id": response.id, "object": "realtime.response", "status": status,
                "status_details": details, "output": response.outputs,
                "conversation_id": f"conv_{self._session.session_id}",
                "output_modalities": ["audio"] if response.speak else ["text"],
                "max_output_tokens": response.max_tokens or "inf",
                "audio": {"output": {"format": {"type": "audio/pcm", "rate": RATE},
                                     "voice": self._choices.voice}},
                "usage": None, "metadata": None}


def _index(response: _Response, item: dict[str, Any]) -> int:
    return next(i for i, o in enumerate(response.outputs) if o is item)
