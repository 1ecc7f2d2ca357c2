"""Voice-to-voice latency at the client: voxlens's streaming pipeline vs a naive cascade.

    .venv/bin/python -m bench.latency [--turns 12] [--transport ws]

Starts a server process (default settings, embedded models) that serves both
designs with the same engines, speaks piper-generated questions to it in real
time over WebSocket, and measures, at the client, from the moment the last
voiced sample of the question was sent to the first reply audio byte received.
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


def serve() -> None:
    """The server side: the normal app plus /naive, sharing one set of engines."""
    import logging

    from server.app import STATE, create_app
    from server.settings import load_settings
    from streaming.ws import WebSocketAdapter

    from bench.naive import NaiveSession

    settings = load_settings()
    logging.basicConfig(level="WARNING")
    app = create_app(settings)

    async def naive(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        assert state.engines is not None
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        session = NaiveSession(uuid.uuid4().hex[:8], state.engines, state.config)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(session.run())
            await WebSocketAdapter(ws, session).run()
        return ws

    app.router.add_get("/naive", naive)
    web.run_app(app, host="127.0.0.1", port=settings.server.port, print=None)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def measure(url: str, audio, rate: int) -> tuple[float, dict[str, float], str]:  # type: ignore[no-untyped-def]
    from client.ws_client import VoxlensClient

    async with VoxlensClient(url) as client:
        voiced_at = await client.stream_audio(audio, rate, trailing_silence_ms=1500)
        reply = await client.wait_reply(timeout=60)
    assert reply.first_audio_at is not None, "no reply audio"
    return (reply.first_audio_at - voiced_at) * 1000, reply.metrics, reply.text


async def run(turns: int, base: str) -> None:
    from piper import PiperVoice

    from pipelines.models import piper_voice
    from tests.conftest import speak

    model, config = piper_voice("joe")
    voice = PiperVoice.load(model, config_path=config)
    questions = [(q, *speak(voice, q)) for q in (QUESTIONS * 3)[:turns]]
    results: dict[str, list[float]] = {"streaming": [], "naive": []}
    stages: dict[str, dict[str, list[float]]] = {"streaming": {}, "naive": {}}
    await measure(f"{base}/ws", questions[0][1], questions[0][2])  # warm both paths once
    await measure(f"{base}/naive", questions[0][1], questions[0][2])
    for i, (q, audio, rate) in enumerate(questions):
        order = ("streaming", "naive") if i % 2 == 0 else ("naive", "streaming")
        for design in order:
            path = "/ws" if design == "streaming" else "/naive"
            ms, metrics, text = await measure(base + path, audio, rate)
            results[design].append(ms)
            for k, v in metrics.items():
                stages[design].setdefault(k, []).append(v)
            print(f"  {design:9s} {ms:7.0f} ms  {q!r} → {text[:60]!r}", file=sys.stderr)

    print(f"\nvoice-to-voice at the client, {turns} spoken turns each, "
          f"{platform.machine()} {platform.processor() or ''}, {__import__('os').cpu_count()} cores")
    print(f"{'design':12s}{'p50 ms':>9s}{'p95 ms':>9s}{'mean ms':>9s}")
    for design, values in results.items():
        print(f"{design:12s}{pct(values, .5):9.0f}{pct(values, .95):9.0f}"
              f"{statistics.mean(values):9.0f}")
    ratio = pct(results["naive"], .5) / pct(results["streaming"], .5)
    print(f"naive / streaming (p50): {ratio:.2f}x")
    for design, per_stage in stages.items():
        print(f"\n{design} waterfall (server, median ms after end of speech):")
        for k, v in sorted(per_stage.items(), key=lambda kv: statistics.median(kv[1])):
            print(f"  {k:18s}{statistics.median(v):8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    from server.launch import spawn

    srv = spawn(["-m", "bench.latency", "--serve"], Path("bench/results/latency-server.log"))
    try:
        asyncio.run(run(args.turns, f"ws://127.0.0.1:{srv.port}"))
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
