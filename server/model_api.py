"""The embedded engines under the OpenAI API: voxlens as the model tier of other nodes.

- ``POST /v1/audio/transcriptions``: multipart ``file`` (any audio FFmpeg reads, up to
  ``vad.max_utterance_ms``), ``language``, ``response_format`` json | verbose_json | text.
- ``POST /v1/audio/speech``: JSON ``input``, ``voice`` (a language of ``tts.voices`` or one
  of its voice names; others: the voice of the text's script), ``response_format`` pcm
  (24 kHz s16le, streamed sentence by sentence) | wav (whole, the voice's own rate).
- ``POST /v1/chat/completions``: the LLM, streamed (server-sent events) or whole, with
  function tools.
- ``GET /v1/models``: the engines' names.

Every request is model work of the one compute scheduler: the ``X-Voxlens-Priority``,
``X-Voxlens-Session`` and ``X-Voxlens-Supersede`` headers a voxlens media node sends
(pipelines/engines/openai_audio.py) place it among the work of this server's own sessions
and every other caller's; without them a transcription is a final, speech a first chunk.
Each client may have ``limits.model_requests_per_client`` requests running; errors come in
the API's shape: ``{"error": {"message", "type", "code", "param"}}``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import numpy as np
from aiohttp import web
from aiohttp.web_request import FileField
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.chunker import Chunker
from pipelines.compute import Dropped, Priority
from pipelines.engines.base import ChatMessage, Sampling, ToolCall, ToolSpec
from pipelines.engines.openai_audio import (
    PRIORITY_HEADER,
    SESSION_HEADER,
    SPEECH_RATE,
    SUPERSEDE_HEADER,
    wav_bytes,
)
from pipelines.session import Engines
from server.limits import Busy, client_of, refusal
from server.state import STATE
from server.transcribe import MediaError, decode_audio
from streaming.audio import MODEL_RATE, float_to_pcm16, resample
from streaming.errors import VoxlensError

MAX_INPUT_CHARS = 4096  # /v1/audio/speech, as OpenAI's
MAX_TOKENS = 1024  # the most a chat completion may ask for
Role = Literal["system", "user", "assistant", "tool"]
Handler = Callable[[web.Request, Engines], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An answer in the API's error shape."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code,
                          "param": self.param}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


def _engine_error(e: VoxlensError) -> ApiError:
    if isinstance(e, Dropped):  # the caller itself queued newer work in its place
        return ApiError(409, "stale", "superseded by the caller's newer request")
    return ApiError(500 if e.code == "engine_failed" else 400, e.code, e.message)


def _guarded(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Ready engines, the client's request limit, and errors in the API's shape."""

    async def route(request: web.Request) -> web.StreamResponse:
        engines = request.app[STATE].engines
        if engines is None:
            return ApiError(503, "not_ready", "models are still loading").response()
        try:
            with request.app[STATE].limits.running("model", client_of(request)):
                return await handler(request, engines)
        except Busy as e:
            return refusal(e)
        except ApiError as e:
            return e.response()
        except VoxlensError as e:
            return _engine_error(e).response()

    return route


def _priority(request: web.Request, default: Priority, allowed: set[Priority]) -> Priority:
    name = request.headers.get(PRIORITY_HEADER)
    if name is None:
        return default
    try:
        priority = Priority[name.upper()]
    except KeyError:
        priority = None
    if priority not in allowed:
        raise ApiError(400, "bad_priority", f"{PRIORITY_HEADER} here is one of "
                       f"{', '.join(sorted(p.name.lower() for p in allowed))}")
    return priority


def _session(request: web.Request) -> str:
    """Who the work is for, for fairness: the caller's session within the caller."""
    return f"{client_of(request)}/{request.headers.get(SESSION_HEADER, '')[:128]}"


def _parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, "bad_request", f"{where}: {first['msg']}" if where else first["msg"],
                       where or None) from e


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except (ValueError, LookupError, RecursionError) as e:
        raise ApiError(400, "bad_request", f"the body is not valid JSON: {e}") from e


# ---- /v1/audio/transcriptions ------------------------------------------------------------

class TranscriptionForm(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    language: str | None = Field(None, pattern=r"^[a-z]{2,3}$")
    response_format: Literal["json", "verbose_json", "text"] = "json"


async def _transcriptions(request: web.Request, engines: Engines) -> web.StreamResponse:
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "bad_request", "send the audio as multipart/form-data with a "
                       "'file' part")
    try:
        post = await request.post()
    # what aiohttp raises on a malformed multipart body (see server/vision_api.py)
    except (ValueError, LookupError, RuntimeError) as e:
        raise ApiError(400, "bad_request", f"malformed multipart request: {e}") from e
    upload = post.get("file")
    if not isinstance(upload, FileField):
        raise ApiError(400, "bad_request", "the 'file' part (the audio) is missing", "file")
    form = _parse(TranscriptionForm, {k: v for k, v in post.items() if isinstance(v, str)})
    try:
        audio = await asyncio.to_thread(decode_audio, upload.file.read())
    except MediaError as e:
        raise ApiError(400, "bad_media", e.message, "file") from e
    longest_ms = request.app[STATE].settings.vad.max_utterance_ms
    if audio.size > longest_ms * MODEL_RATE // 1000:
        raise ApiError(400, "too_long", f"the audio is longer than {longest_ms / 1000:g} s, "
                       "this server's longest utterance: use `voxlens transcribe` for files",
                       "file")
    priority = _priority(request, Priority.ASR_FINAL, {Priority.ASR_FINAL, Priority.ASR_PARTIAL})
    session = _session(request)
    supersede = request.headers.get(SUPERSEDE_HEADER)
    result = await engines.asr.transcribe(
        audio, language=form.language, priority=priority, session=session,
        key=None if supersede is None else ("remote", session, supersede[:64]))
    if form.response_format == "text":
        return web.Response(text=result.text)
    body: dict[str, Any] = {"text": result.text}
    if form.response_format == "verbose_json":
        seconds = audio.size / MODEL_RATE
        body.update(task="transcribe", language=result.language or form.language,
                    duration=seconds, segments=[{
                        "id": 0, "start": 0.0, "end": seconds, "text": result.text,
                        "avg_logprob": result.avg_logprob,
                        "no_speech_prob": result.no_speech_prob}])
    return web.json_response(body)


# ---- /v1/audio/speech --------------------------------------------------------------------

class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    input: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    voice: str = ""
    response_format: Literal["pcm", "wav"] = "pcm"


def _speech_language(voices: dict[str, str], voice: str) -> str | None:
    """The language a requested voice stands for (None: the text's script chooses)."""
    if voice in voices:
        return voice
    return next((lang for lang, name in voices.items() if name == voice), None)


async def _speech(request: web.Request, engines: Engines) -> web.StreamResponse:
    speech = _parse(SpeechRequest, await _json(request))
    settings = request.app[STATE].settings
    language = _speech_language(settings.tts.voices, speech.voice)
    first = _priority(request, Priority.TTS_FIRST, {Priority.TTS_FIRST, Priority.TTS_REST})
    session = _session(request)
    chunker = Chunker(first_words=settings.tts.first_chunk_words)
    chunks = chunker.feed(speech.input) + chunker.flush()
    if not chunks:
        raise ApiError(400, "bad_request", "the input has nothing to say", "input")
    tts = engines.tts

    async def say(i: int) -> Any:
        priority = first if i == 0 else Priority.TTS_REST
        return await tts.synthesize(chunks[i], priority=priority, session=session,
                                    language=language)

    if speech.response_format == "wav":
        parts = [await say(i) for i in range(len(chunks))]
        audio = np.concatenate(parts)
        return web.Response(body=wav_bytes(audio, tts.sample_rate), content_type="audio/wav")
    # pcm: the first chunk's audio is awaited before the answer starts (a failure is still
    # an error answer), the rest is streamed as each chunk is said
    head = await say(0)
    response = web.StreamResponse(headers={"Content-Type": "audio/pcm"})
    await response.prepare(request)
    await response.write(float_to_pcm16(resample(head, tts.sample_rate, SPEECH_RATE)))
    for i in range(1, len(chunks)):
        try:
            audio = await say(i)
        except VoxlensError:  # the status is sent: a short answer is all that can be said
            break
        await response.write(float_to_pcm16(resample(audio, tts.sample_rate, SPEECH_RATE)))
    await response.write_eof()
    return response


# ---- /v1/chat/completions ----------------------------------------------------------------

class _Function(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object",
                                                                "properties": {}})


class _Tool(BaseModel):
    type: Literal["function"]
    function: _Function


class _CallFunction(BaseModel):
    name: str
    arguments: str = "{}"


class _Call(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: _CallFunction


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None
    tool_calls: list[_Call] = []
    tool_call_id: str | None = None

    def chat(self) -> ChatMessage:
        text = (self.content if isinstance(self.content, str)
                else "".join(p.text for p in self.content or ()))
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments)
                      for c in self.tool_calls)
        role: Role = "system" if self.role == "developer" else self.role
        return ChatMessage(role, text, calls, self.tool_call_id)


class _NamedChoice(BaseModel):
    type: Literal["function"]
    function: _CallFunction | dict[str, str]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    messages: list[_Message] = Field(min_length=1, max_length=512)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    tools: list[_Tool] = Field([], max_length=128)
    tool_choice: Literal["auto", "none", "required"] | _NamedChoice = "auto"

    def sampling(self) -> Sampling:
        choice = self.tool_choice
        if isinstance(choice, _NamedChoice):
            name = choice.function.name if isinstance(choice.function, _CallFunction) else \
                choice.function.get("name", "")
            return Sampling(self.temperature, name)
        return Sampling(self.temperature, choice)


def _chunk(reply_id: str, model: str, delta: dict[str, Any],
           finish: str | None = None) -> bytes:
    body = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def _wire_call(i: int, call: ToolCall) -> dict[str, Any]:
    return {"index": i, "id": call.call_id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


async def _chat(request: web.Request, engines: Engines) -> web.StreamResponse:
    chat = _parse(ChatRequest, await _json(request))
    messages = [m.chat() for m in chat.messages]
    tools = [ToolSpec(t.function.name, t.function.description, t.function.parameters)
             for t in chat.tools]
    max_tokens = min(chat.max_completion_tokens or chat.max_tokens or MAX_TOKENS, MAX_TOKENS)
    reply_id = "chatcmpl-" + uuid.uuid4().hex
    stream = engines.llm.stream(messages, max_tokens=max_tokens, session=_session(request),
                                tools=tools, sampling=chat.sampling())
    try:
        if not chat.stream:
            return await _whole(stream, reply_id, engines.llm.name)
        return await _streamed(request, stream, reply_id, engines.llm.name)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def _whole(stream: AsyncIterator[str | ToolCall], reply_id: str,
                 model: str) -> web.Response:
    text: list[str] = []
    calls: list[ToolCall] = []
    async for piece in stream:
        if isinstance(piece, str):
            text.append(piece)
        else:
            calls.append(piece)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        message["tool_calls"] = [_wire_call(i, c) for i, c in enumerate(calls)]
    return web.json_response({
        "id": reply_id, "object": "chat.completion", "created": int(time.time()),
        "model": model, "choices": [{"index": 0, "message": message,
                                     "finish_reason": "tool_calls" if calls else "stop"}]})


async def _streamed(request: web.Request, stream: AsyncIterator[str | ToolCall], reply_id: str,
                    model: str) -> web.StreamResponse:
    """Server-sent chunks. The first piece is awaited before the answer starts, so an engine
    that fails at once still gets an error status; a later failure ends the stream with an
    ``error`` object."""
    piece: str | ToolCall | None = await anext(stream, None)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(_chunk(reply_id, model, {"role": "assistant", "content": ""}))
    calls = 0
    try:
        while piece is not None:
            if isinstance(piece, str):
                await response.write(_chunk(reply_id, model, {"content": piece}))
            else:
                await response.write(_chunk(reply_id, model,
                                            {"tool_calls": [_wire_call(calls, piece)]}))
                calls += 1
            piece = await anext(stream, None)
        await response.write(_chunk(reply_id, model, {}, "tool_calls" if calls else "stop"))
    except VoxlensError as e:
        await response.write(f"data: {json.dumps(_engine_error(e).body())}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _models(request: web.Request, engines: Engines) -> web.StreamResponse:
    return web.json_response({"object": "list", "data": [
        {"id": name, "object": "model", "owned_by": f"voxlens {role}"}
        for role, name in engines.names().items() if role in ("asr", "llm", "tts")]})


def setup_model_api(app: web.Application) -> None:
    app.router.add_post("/v1/audio/transcriptions", _guarded(_transcriptions))
    app.router.add_post("/v1/audio/speech", _guarded(_speech))
    app.router.add_post("/v1/chat/completions", _guarded(_chat))
    app.router.add_get("/v1/models", _guarded(_models))
