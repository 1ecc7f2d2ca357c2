"""``POST /v1/vision/ask``: one-shot visual question answering, no conversation needed.

Multipart (``image`` file + ``question`` field) or JSON (``{"image": "data:image/jpeg;base64,…",
"question": "…"}``) → ``{"answer", "observations", "model"}``. The vision engine describes the
image (answering the question itself where the engine can); the LLM words the answer from
that observation alone.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from pipelines.compute import Priority
from pipelines.engines.base import ChatMessage
from pipelines.vision import VisualMemory
from server.limits import Busy, client_of, refusal
from server.state import STATE
from streaming.errors import ProtocolError, VoxlensError
from streaming.images import MAX_BYTES, decode_base64_image, decode_image

MAX_QUESTION = 1000
ANSWER_PROMPT = ("You answer questions about a picture. You cannot see it: use only the "
                 "observations below, say when they do not tell, and answer in one short "
                 "sentence in the language of the question.")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


async def _read(request: web.Request) -> tuple[str | bytes, str]:
    """(image bytes or base64/data URL, question) from a multipart or JSON request."""
    if (request.content_length or 0) > MAX_BYTES * 4 // 3 + 65536:
        raise ProtocolError("request too large", code="too_large")
    if request.content_type.startswith("multipart/"):
        image: bytes | None = None
        question = ""
        try:
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "image":
                    image = bytes(await part.read(decode=True))
                elif part.name == "question":
                    question = (await part.text())[:MAX_QUESTION + 1]
        # what aiohttp's multipart reader raises on a malformed body: no or wrong boundary
        # (ValueError), an unknown charset (LookupError) or encoding (RuntimeError), bad
        # compressed data (zlib.error), too many part headers (HttpProcessingError)
        except (ValueError, LookupError, RuntimeError, zlib.error, HttpProcessingError) as e:
            raise ProtocolError(f"malformed multipart request: {e}") from e
        if image is None:
            raise ProtocolError('multipart request needs an "image" file part')
        return image, question
    try:
        body = await request.json()
    # ValueError: not JSON, not in its charset, or a number too long; LookupError: an unknown
    # charset; RecursionError: nested too deeply
    except (ValueError, LookupError, RecursionError) as e:
        raise ProtocolError(f"request is neither multipart nor valid JSON: {e}") from e
    if not isinstance(body, dict) or not isinstance(body.get("image"), str):
        raise ProtocolError('JSON request needs "image": a data URL or base64 string')
    question = body.get("question") or ""
    if not isinstance(question, str):
        raise ProtocolError('"question" must be a string')
    return body["image"], question


async def vision_ask(request: web.Request) -> web.Response:
    """At most ``limits.vision_asks_per_client`` at once per client (429 ``busy`` beyond),
    held from before the upload is read until the answer."""
    try:
        with request.app[STATE].limits.running("vision", client_of(request)):
            return await _vision_ask(request)
    except Busy as e:
        return refusal(e)


async def _vision_ask(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engines = state.engines
    if engines is None:
        return _error(503, "not_ready", "models are still loading")
    if engines.vlm is None:
        return _error(404, "unsupported", "vision is not enabled on this server")
    try:
        raw, question = await _read(request)
        question = question.strip() or "What do you see?"
        if len(question) > MAX_QUESTION:
            raise ProtocolError(f"question longer than {MAX_QUESTION} characters")
        decode = decode_image if isinstance(raw, bytes) else decode_base64_image
        image = await asyncio.to_thread(decode, raw)  # type: ignore[arg-type]
    except ProtocolError as e:
        return _error(413 if e.code == "too_large" else 400, e.code, e.message)
    try:
        observation = await engines.vlm.look(image, question=question, priority=Priority.LLM)
        memory = VisualMemory(1)
        memory.add(observation, 0.0)
        block = memory.prompt_block(0.0, 1)
        messages = [ChatMessage("system", f"{ANSWER_PROMPT}\n\n{block}"),
                    ChatMessage("user", question)]
        answer = "".join([d async for d in engines.llm.stream(messages, max_tokens=80)
                          if isinstance(d, str)])
    except VoxlensError as e:
        return _error(500, e.code, e.message)
    return web.json_response({"answer": answer.strip(), "observations": [observation],
                              "model": engines.vlm.name})
