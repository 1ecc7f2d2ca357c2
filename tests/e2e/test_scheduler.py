"""The compute scheduler with the real engines: sessions side by side, floods, metrics."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest

from client.common.ws_client import VoxlensClient
from pipelines import models
from pipelines.compute import Compute, Priority
from pipelines.engines.asr_whisper import WhisperAsr
from streaming.audio import resample
from tests.conftest import Server, speak


async def test_two_sessions_speaking_at_once_both_get_their_answers(server: Server, voice) -> None:  # type: ignore[no-untyped-def]
    questions = {"What is the capital of France?": "paris",
                 "What is the capital of Italy?": "rome"}

    async def converse(question: str) -> tuple[str | None, str]:
        audio, rate = speak(voice, question)
        async with VoxlensClient(server.ws) as client:
            await client.stream_audio(audio, rate)
            reply = await client.wait_reply(timeout_s=90)
        return reply.transcript, reply.text

    results = await asyncio.gather(*(converse(q) for q in questions))
    for (question, answer), (transcript, text) in zip(questions.items(), results, strict=True):
        assert transcript is not None
        assert question.lower().rstrip("?") in transcript.lower(), transcript
        assert answer in text.lower(), text


async def test_metrics_endpoint_reports_lanes_turns_and_sessions(server: Server) -> None:
    async with VoxlensClient(server.ws) as client:
        await client.say("Hello!")
        await client.wait_reply(timeout_s=60)
        async with aiohttp.ClientSession() as http, http.get(f"{server.http}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    for needle in ('voxlens_queue_wait_seconds_count{lane="llm",work="llm"}',
                   'voxlens_run_seconds_count{lane="tts",work="tts_first"}',
                   'voxlens_batch_size_bucket{lane="tts"',
                   'voxlens_turn_stage_seconds_count{stage="first_audio_sent"}',
                   'voxlens_sessions{transport="ws"} 1.0',
                   "voxlens_dropped_stale_total", "voxlens_cancelled_total"):
        assert needle in text, needle


@pytest.fixture(scope="module")
def whisper() -> tuple[WhisperAsr, Compute]:
    compute = Compute()
    asr = WhisperAsr(models.whisper_model("tiny.en", models.default_cache_dir()), compute)
    return asr, compute


async def test_a_background_flood_does_not_starve_another_sessions_final(whisper, voice) -> None:  # type: ignore[no-untyped-def]
    asr, compute = whisper
    audio, rate = speak(voice, "What is the capital of France?")
    audio = resample(audio, rate, 16000)
    noise = np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32) * 0.01
    done: list[str] = []

    async def flood(i: int) -> None:  # session A: many background requests, none superseded
        await asyncio.wait_for(asr.transcribe(noise, language="en", priority=Priority.VISION,
                                              session="A", key=("flood", i)), 120)
        done.append(f"A{i}")

    async def final() -> str:  # session B: one urgent final, asked after the flood
        await asyncio.sleep(0.2)
        result = await asr.transcribe(audio, language="en", priority=Priority.ASR_FINAL,
                                      session="B")
        done.append("B")
        return result.text

    floods = [asyncio.create_task(flood(i)) for i in range(12)]
    text = await final()
    await asyncio.gather(*floods)
    assert "capital of france" in text.lower()
    # B ran as soon as the lane was free: after the batch already running when it came
    # (at most max_batch items of the flood), before the rest of the flood
    after_b = len(done) - 1 - done.index("B")
    assert after_b >= 12 - compute.lane("asr")._policy.max_batch


async def test_a_camera_flood_does_not_starve_another_session(server: Server, voice) -> None:  # type: ignore[no-untyped-def]
    """Session A floods the server with changing camera frames while session B speaks: B's
    turn completes correctly, and A's frames are mostly dropped (keep-latest), never queued."""
    import base64

    from skimage import data as photos

    from streaming.images import encode_jpeg

    frames = [base64.b64encode(encode_jpeg(p)).decode()
              for p in (photos.chelsea(), photos.coffee(), photos.astronaut(), photos.rocket())]

    async def vision_runs() -> float:
        async with aiohttp.ClientSession() as http, http.get(f"{server.http}/metrics") as r:
            text = await r.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('voxlens_run_seconds_count{lane="vision"'))

    before = await vision_runs()
    audio, rate = speak(voice, "What is the capital of France?")
    async with VoxlensClient(server.ws) as flooder, VoxlensClient(server.ws) as speaker:
        async def flood() -> None:
            for k in range(60):
                await flooder.send({"type": "image", "data": frames[k % len(frames)]})
                await asyncio.sleep(0.05)

        flooding = asyncio.create_task(flood())
        await speaker.stream_audio(audio, rate)
        reply = await speaker.wait_reply(timeout_s=90)
        await flooding
        await flooder.wait_for(lambda: any(e["type"] == "scene" for e in flooder.events), 30)
    assert reply.transcript and "capital of france" in reply.transcript.lower()
    assert "paris" in reply.text.lower()
    looked = await vision_runs() - before
    assert 1 <= looked < 20  # 60 frames sent: most were replaced by newer ones before a look
