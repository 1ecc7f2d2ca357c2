"""Speech models on another server, over the OpenAI audio API.

``OpenAiAsr`` posts each utterance to ``{base_url}/audio/transcriptions`` (a 16 kHz WAV,
``verbose_json``); ``OpenAiTts`` posts each chunk of a reply to ``{base_url}/audio/speech``
and reads the streamed 24 kHz PCM. Any server of that API will do — another voxlens (its
``/v1/audio/…`` routes), vLLM, speaches, Kokoro-FastAPI, OpenAI.

Both queue on a remote lane of the compute scheduler (``Compute.remote``): the same
priorities as the local engines (a final before a partial, a reply's first chunk before
the rest), stale partials superseded, a bounded number of requests in flight, no local
core held. Each request also tells the server what it is (``X-Voxlens-Priority``,
``X-Voxlens-Session``, ``X-Voxlens-Supersede``): a voxlens model server orders the work
of all its callers by them; other servers ignore them. A server that is down or slow
becomes an ``EngineError`` for that utterance or reply (an ``error`` event), not a stuck
session.
"""

from __future__ import annotations

import io
import wave
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import httpx
import numpy as np

from pipelines.compute import Compute, Priority
from pipelines.engines.base import AsrResult
from pipelines.engines.llm_openai import openai_client
from streaming.audio import MODEL_RATE, Float32Array, float_to_pcm16, pcm16_to_float
from streaming.errors import EngineError

PRIORITY_HEADER = "X-Voxlens-Priority"  # a Priority's name, lower case ("asr_final" …)
SESSION_HEADER = "X-Voxlens-Session"  # the caller's session, for fairness between sessions
SUPERSEDE_HEADER = "X-Voxlens-Supersede"  # queued work of the caller with the same value is stale
SPEECH_RATE = 24_000  # the API's "pcm" format: 24 kHz, 16-bit, mono
# the names OpenAI's verbose_json gives the languages voxlens speaks (others: undetected)
LANGUAGE_NAMES = {"english": "en", "chinese": "zh"}

T = TypeVar("T")


def routing_headers(priority: Priority, session: str | None,
                    key: Hashable | None = None) -> dict[str, str]:
    headers = {PRIORITY_HEADER: priority.name.lower()}
    if session:
        headers[SESSION_HEADER] = session
    if key is not None:
        headers[SUPERSEDE_HEADER] = str(hash(key))
    return headers


def wav_bytes(audio: Float32Array, rate: int) -> bytes:
    """Mono float audio as a 16-bit PCM WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(float_to_pcm16(audio))
    return out.getvalue()


def language_code(language: object) -> str | None:
    """A language as a code: codes as they are, OpenAI's names of ours mapped, else None."""
    if not isinstance(language, str) or not language:
        return None
    language = language.lower()
    return LANGUAGE_NAMES.get(language, language if len(language) <= 3 else None)


def transcription_result(body: Any) -> AsrResult:
    """An ``AsrResult`` from a ``json`` or ``verbose_json`` transcription answer."""
    if not isinstance(body, dict) or not isinstance(body.get("text"), str):
        raise EngineError(f"the ASR endpoint answered without a text: {str(body)[:200]}")
    segments = [s for s in body.get("segments") or () if isinstance(s, dict)]
    no_speech = max((float(s.get("no_speech_prob", 0.0)) for s in segments), default=0.0)
    logprob = (sum(float(s.get("avg_logprob", 0.0)) for s in segments) / len(segments)
               if segments else 0.0)
    return AsrResult(body["text"].strip(), language_code(body.get("language")), no_speech, logprob)


class _Endpoint:
    """One model server: its HTTP client, its remote lane, and how a request fails."""

    def __init__(self, role: str, url: str, compute: Compute, *, api_key: str | None,
                 timeout_s: float, slots: int) -> None:
        self.role = role
        self.url = url
        self._compute = compute
        self._slots = slots
        self._lane = f"{role}@{url}"
        self.client = openai_client(api_key, timeout_s)

    async def request(self, priority: Priority, fn: Callable[[], Awaitable[T]], *,
                      session: str | None, key: Hashable | None = None) -> T:
        try:
            return await self._compute.remote(self._lane, self._slots, priority, fn,
                                              session=session, key=key)
        except httpx.HTTPError as e:  # str() of a timeout is empty: name the error too
            raise EngineError(f"{self.role} endpoint {self.url} failed: "
                              f"{type(e).__name__} {e}".rstrip()) from e

    def check(self, response: httpx.Response, body: bytes) -> None:
        if response.status_code != 200:
            detail = body.decode("utf-8", "replace")[:300]
            raise EngineError(f"{self.role} endpoint answered {response.status_code}: {detail}")


class OpenAiAsr:
    def __init__(self, base_url: str, model: str, compute: Compute, *,
                 api_key: str | None = None, timeout_s: float = 10.0, slots: int = 8) -> None:
        self.name = f"openai-asr:{model}"
        self._model = model
        self._endpoint = _Endpoint("ASR", base_url.rstrip("/") + "/audio/transcriptions",
                                   compute, api_key=api_key, timeout_s=timeout_s, slots=slots)

    async def transcribe(self, audio: Float32Array, *, language: str | None,
                         priority: Priority, session: str | None = None,
                         key: Hashable | None = None) -> AsrResult:
        upload = wav_bytes(audio, MODEL_RATE)
        form = {"model": self._model, "response_format": "verbose_json"}
        if language:
            form["language"] = language
        e = self._endpoint

        async def post() -> AsrResult:
            r = await e.client.post(e.url, data=form, headers=routing_headers(priority, session, key),
                                    files={"file": ("speech.wav", upload, "audio/wav")})
            e.check(r, r.content)
            try:
                return transcription_result(r.json())
            except ValueError as error:
                raise EngineError(f"the ASR endpoint answered no JSON: {r.text[:200]}") from error

        return await e.request(priority, post, session=session, key=key)

    async def aclose(self) -> None:
        await self._endpoint.client.aclose()


class OpenAiTts:
    """One voice of a speech server (``voice``: that server's name for it)."""

    sample_rate = SPEECH_RATE

    def __init__(self, base_url: str, model: str, voice: str, compute: Compute, *,
                 api_key: str | None = None, timeout_s: float = 10.0, slots: int = 8) -> None:
        self.name = f"openai-tts:{voice}"
        self._body = {"model": model, "voice": voice, "response_format": "pcm"}
        self._endpoint = _Endpoint("TTS", base_url.rstrip("/") + "/audio/speech", compute,
                                   api_key=api_key, timeout_s=timeout_s, slots=slots)

    async def synthesize(self, text: str, *, priority: Priority, session: str | None = None,
                         language: str | None = None) -> Float32Array:
        e = self._endpoint

        async def post() -> Float32Array:
            async with e.client.stream("POST", e.url, json={**self._body, "input": text},
                                       headers=routing_headers(priority, session)) as r:
                pcm = b"".join([piece async for piece in r.aiter_bytes()])
            e.check(r, pcm)
            if not pcm:
                return np.zeros(0, dtype=np.float32)
            return pcm16_to_float(pcm[: len(pcm) - len(pcm) % 2])

        return await e.request(priority, post, session=session)

    async def aclose(self) -> None:
        await self._endpoint.client.aclose()
