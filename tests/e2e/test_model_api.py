"""voxlens as a model server (issue 16, point 1): ``/v1/audio/transcriptions``,
``/v1/audio/speech`` and ``/v1/chat/completions`` of the real server with the packaged
models, called with the official ``openai`` SDK. Speech said by the server is heard back by
its own ASR; bad requests get the API's error shape and harm nothing else."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
from openai import AsyncOpenAI, BadRequestError

from pipelines.engines.openai_audio import wav_bytes
from server.launch import ServerProcess
from streaming.audio import pcm16_to_float
from tests.mandarin import cer


@pytest.fixture
def api(server: ServerProcess) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.http}/v1", api_key="unused-on-loopback", max_retries=0)


def wav(pcm: bytes, rate: int) -> bytes:
    return wav_bytes(pcm16_to_float(pcm), rate)


def post(server: ServerProcess, path: str, body: bytes,
         headers: dict[str, str]) -> tuple[int, dict]:  # type: ignore[type-arg]
    request = urllib.request.Request(f"{server.http}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def test_transcriptions_of_real_speech(api: AsyncOpenAI, testdata: Path,
                                            zh_speech: list[tuple[Path, str]]) -> None:
    with (testdata / "jfk.wav").open("rb") as f:
        verbose = await api.audio.transcriptions.create(model="voxlens", file=f,
                                                        response_format="verbose_json")
    assert "ask not what your country can do for you" in verbose.text.lower()
    assert verbose.language == "en" and verbose.segments and verbose.duration > 10
    path, said = zh_speech[0]
    text = await api.audio.transcriptions.create(model="voxlens", file=path.read_bytes(),
                                                 response_format="text", language="zh")
    assert cer(said, str(text)) < 0.3


async def test_speech_is_streamed_pcm_the_servers_own_ear_understands(api: AsyncOpenAI) -> None:
    said = "The weather is lovely today. Let us go for a walk in the park."
    async with api.audio.speech.with_streaming_response.create(
            model="voxlens", voice="joe", input=said, response_format="pcm") as r:
        pieces = [piece async for piece in r.iter_bytes()]
    pcm = b"".join(pieces)
    assert len(pcm) > 24_000 * 2  # over a second of 24 kHz 16-bit audio
    heard = await api.audio.transcriptions.create(model="voxlens", file=("s.wav", wav(pcm, 24_000)))
    assert "weather" in heard.text.lower() and "walk" in heard.text.lower()


async def test_mandarin_speech_as_wav_by_language(api: AsyncOpenAI) -> None:
    said = "今天天气很好，我们去公园散步吧。"
    r = await api.audio.speech.create(model="voxlens", voice="zh", input=said,
                                      response_format="wav")
    with wave.open(io.BytesIO(r.content)) as w:
        rate, frames = w.getframerate(), w.readframes(w.getnframes())
    assert rate > 0 and len(pcm16_to_float(frames)) > rate  # over a second
    heard = await api.audio.transcriptions.create(model="voxlens", file=("s.wav", r.content),
                                                  response_format="verbose_json")
    assert heard.language == "zh" and cer(said, heard.text) < 0.4


async def test_chat_completions_whole_streamed_and_with_tools(api: AsyncOpenAI) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    whole = await api.chat.completions.create(model="voxlens", messages=question,  # type: ignore[arg-type]
                                              temperature=0)
    assert "paris" in (whole.choices[0].message.content or "").lower()
    assert whole.choices[0].finish_reason == "stop"
    stream = await api.chat.completions.create(model="voxlens", messages=question,  # type: ignore[arg-type]
                                               temperature=0, stream=True)
    deltas, finish = [], None
    async for chunk in stream:
        deltas.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "paris" in "".join(deltas).lower() and len(deltas) > 2 and finish == "stop"
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "The weather now in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    called = await api.chat.completions.create(
        model="voxlens", temperature=0, tools=[weather], tool_choice="required",  # type: ignore[list-item]
        messages=[{"role": "user", "content": "What's the weather in Berlin?"}])
    (call,) = called.choices[0].message.tool_calls or []
    assert called.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert "berlin" in json.loads(call.function.arguments)["city"].lower()  # type: ignore[union-attr]


async def test_bad_requests_get_the_apis_error_shape(api: AsyncOpenAI, server: ServerProcess) -> None:
    with pytest.raises(BadRequestError) as bad_media:
        await api.audio.transcriptions.create(model="voxlens", file=("x.wav", b"not audio at all"))
    assert bad_media.value.code == "bad_media"
    with pytest.raises(BadRequestError) as bad_format:
        await api.audio.speech.create(model="voxlens", voice="joe", input="Hi.",
                                      response_format="mp3")
    assert bad_format.value.code == "bad_request" and "response_format" in str(bad_format.value)
    with pytest.raises(BadRequestError) as no_messages:
        await api.chat.completions.create(model="voxlens", messages=[])
    assert no_messages.value.code == "bad_request"
    status, body = post(server, "/v1/chat/completions", b"{not json",
                        {"Content-Type": "application/json"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    silence = wav(np.zeros(16_000, "<i2").tobytes(), 16_000)
    form = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\n" + silence + b"\r\n--b--\r\n")
    status, body = post(server, "/v1/audio/transcriptions", form, {
        "Content-Type": "multipart/form-data; boundary=b", "X-Voxlens-Priority": "vision"})
    assert status == 400 and body["error"]["code"] == "bad_priority"
    # the server goes on: a good request right after is answered
    models = await api.models.list()
    assert {m.owned_by for m in models.data} == {"voxlens asr", "voxlens llm", "voxlens tts"}
