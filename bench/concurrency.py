"""Many simulated conversations at once over WebSocket: the scheduler vs first-come-first-served.

    .venv/bin/python -m bench.concurrency [--sessions 1 2 4 8 16] [--seconds 45]

For each N, a fresh server (default settings, embedded models) serves N
clients. Each client streams its microphone continuously in real time (20 ms
frames, silence between questions) and speaks a real (piper) question every
~15 s, the clients staggered across the period, and (camera on) sends a camera frame a
second. Reported per N: voice-to-voice
p50/p95 at the client (from the last voiced sample sent to the first reply
audio received; a reply that never came counts as the run's length), the lag
of partial transcripts (arrival − the input position they reach), stale work
dropped (/metrics), and the server's CPU use. The same runs with
``VOXLENS_SCHEDULER__FIFO=true`` give the first-come-first-served baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from bench.latency import QUESTIONS, pct
from client.wavio import last_voiced_sample
from client.ws_client import VoxlensClient
from server.launch import spawn_server
from streaming.audio import Float32Array, float_to_pcm16, resample

PERIOD_S = 15.0
FRAME_MS = 20
TARGET_P95_MS = 1500.0


@dataclass
class Figures:
    v2v_ms: list[float] = field(default_factory=list)
    partial_lag_ms: list[float] = field(default_factory=list)
    missed: int = 0


class Microphone:
    """Streams 16 kHz PCM in real time; silence unless an utterance is queued."""

    def __init__(self, client: VoxlensClient) -> None:
        self.client = client
        self.queue: list[float] = []  # samples still to send
        self.voiced_end: int | None = None  # sample index (stream) where the voice ends
        self.voiced_sent_at: float | None = None
        self.sent = 0  # samples sent so far
        self.start = 0.0

    def say(self, audio: Float32Array) -> None:
        self.voiced_end = self.sent + len(self.queue) + last_voiced_sample(audio, 16000)
        self.voiced_sent_at = None
        self.queue.extend(audio.tolist())

    async def run(self) -> None:
        step = 16 * FRAME_MS
        self.start = time.monotonic()
        k = 0
        while True:
            delay = self.start + k * FRAME_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = np.array(self.queue[:step], dtype=np.float32)
            del self.queue[:step]
            chunk = np.pad(chunk, (0, step - chunk.size))
            await self.client.send_raw(float_to_pcm16(chunk))
            self.sent += step
            if self.voiced_end is not None and self.sent >= self.voiced_end:
                self.voiced_sent_at = time.monotonic()
                self.voiced_end = None
            k += 1


async def camera(client: VoxlensClient, frames: list[str]) -> None:
    """A frame a second; the scene changes every 10 s."""
    k = 0
    while True:
        await client.send({"type": "image", "data": frames[(k // 10) % len(frames)]})
        k += 1
        await asyncio.sleep(1.0)


async def one_client(url: str, offset_s: float, seconds: float, utterances: list[Float32Array],
                     figures: Figures, frames: list[str] | None) -> None:
    async with VoxlensClient(url) as client:
        mic = Microphone(client)
        sender = asyncio.create_task(mic.run())
        eye = asyncio.create_task(camera(client, frames)) if frames else None
        try:
            await asyncio.sleep(offset_s)
            deadline = time.monotonic() + seconds
            k = 0
            while time.monotonic() + 5 < deadline:
                slot = time.monotonic()
                mic.say(utterances[k % len(utterances)])
                k += 1
                try:
                    reply = await client.wait_reply(timeout_s=max(1.0, deadline - time.monotonic()))
                    await client.wait_for(lambda r=reply: r.first_audio_at is not None, 5)
                    assert reply.first_audio_at is not None and mic.voiced_sent_at is not None
                    figures.v2v_ms.append((reply.first_audio_at - mic.voiced_sent_at) * 1000)
                except (TimeoutError, ConnectionError):
                    figures.missed += 1
                await asyncio.sleep(max(0.0, slot + PERIOD_S - time.monotonic()))
        finally:
            for task in (sender, eye):
                if task is not None:
                    task.cancel()
            await asyncio.gather(sender, *([eye] if eye else []), return_exceptions=True)
        arrivals = [(e, t) for e, t in zip(client.events, client.arrivals, strict=True)
                    if e.get("type") == "transcript" and not e["final"] and "audio_ms" in e]
        for ev, at in arrivals:
            figures.partial_lag_ms.append((at - (mic.start + ev["audio_ms"] / 1000)) * 1000)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stale_count(http_base: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{http_base}/metrics") as r:
        text = await r.text()
    return sum(float(v) for v in re.findall(r"^voxlens_dropped_stale_total\{.*\} (\S+)$", text,
                                            re.M))


async def run_n(n: int, seconds: float, utterances: list[Float32Array], fifo: bool,
                frames: list[str] | None) -> dict[str, float]:
    env = {"VOXLENS_SERVER__MAX_SESSIONS": "64", "VOXLENS_SCHEDULER__ADMISSION_WAIT_MS": "1e9",
           "VOXLENS_SCHEDULER__FIFO": "true" if fifo else "false",
           # every simulated person comes from 127.0.0.1: one client to the per-client limits
           "VOXLENS_LIMITS__SESSIONS_PER_CLIENT": "0", "VOXLENS_LIMITS__CONNECTIONS_PER_MINUTE": "0"}
    name = f"concurrency-{n}-{'fifo' if fifo else 'policy'}-{'camera' if frames else 'blind'}"
    server = spawn_server(Path(f"bench/results/{name}.log"), env=env)
    try:
        figures = Figures()
        cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
        await asyncio.gather(*(one_client(server.ws, i * PERIOD_S / n, seconds, utterances,
                                          figures, frames) for i in range(n)))
        cpu = (cpu_seconds(server.proc.pid) - cpu0) / (time.monotonic() - t0)
        stale = await stale_count(server.http)
    finally:
        server.stop()
    v2v = figures.v2v_ms + [seconds * 1000] * figures.missed
    lag = figures.partial_lag_ms or [float("nan")]
    return {"n": n, "turns": len(v2v), "missed": figures.missed, "p50": pct(v2v, .5),
            "p95": pct(v2v, .95), "lag50": statistics.median(lag), "lag95": pct(lag, .95),
            "stale": stale, "cpu": cpu * 100}


def table(title: str, rows: list[dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"{'N':>3} {'turns':>5} {'missed':>6} {'p50 ms':>7} {'p95 ms':>7} {'partial lag p50/p95 ms':>23}"
          f" {'stale':>6} {'CPU %':>6}")
    for r in rows:
        print(f"{r['n']:3.0f} {r['turns']:5.0f} {r['missed']:6.0f} {r['p50']:7.0f} {r['p95']:7.0f} "
              f"{r['lag50']:11.0f} / {r['lag95']:<9.0f} {r['stale']:6.0f} {r['cpu']:6.0f}")
    ok = [r["n"] for r in rows if r["p95"] <= TARGET_P95_MS]
    print(f"largest N with p95 <= {TARGET_P95_MS:.0f} ms: {max(ok) if ok else 'none'}")


async def main_async(sessions: list[int], seconds: float) -> None:
    from piper import PiperVoice

    from pipelines.models import piper_voice

    model, config = piper_voice("joe")
    voice = PiperVoice.load(model, config_path=config)
    utterances = []
    for q in QUESTIONS:
        chunks = list(voice.synthesize(q))
        audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        utterances.append(resample(audio, chunks[0].sample_rate, 16000))
    from skimage import data as photos

    from streaming.images import encode_jpeg

    frames = [base64.b64encode(encode_jpeg(p)).decode()
              for p in (photos.chelsea(), photos.coffee(), photos.astronaut(), photos.rocket())]
    runs = {"scheduler, camera on": (False, frames), "first-come-first-served, camera on":
            (True, frames), "scheduler, camera off": (False, None)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for n in sessions:
        for name, (fifo, cam) in runs.items():
            row = await run_n(n, seconds, utterances, fifo, cam)
            results[name].append(row)
            print(f"  N={n} {name}: p50 {row['p50']:.0f} ms, p95 {row['p95']:.0f} ms, "
                  f"missed {row['missed']:.0f}", flush=True)
    print(f"\n{os.cpu_count()} cores; each client asks every {PERIOD_S:.0f} s for {seconds:.0f} s; "
          "camera on = a frame a second, the scene changing every 10 s")
    for name, rows in results.items():
        table(name, rows)
    on, fifo_on, off = (results[name][-1] for name in runs)
    print(f"\nat N={on['n']:.0f}: p95 fifo / scheduler = {fifo_on['p95'] / on['p95']:.2f}x; "
          f"camera on / off = {on['p95'] / off['p95']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=45.0)
    args = parser.parse_args()
    asyncio.run(main_async(args.sessions, args.seconds))


if __name__ == "__main__":
    main()
