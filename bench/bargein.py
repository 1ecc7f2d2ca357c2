"""Barge-in: interruption latency, false interruptions, and self-interruption under echo.

    .venv/bin/python -m bench.bargein [--trials 20]

Starts a server (default settings, embedded models) and talks to it over WebSocket through a
simulated room (client/common/acoustics.py): the reply plays from a loudspeaker as it arrives and the
microphone streams continuously. By default the room is a speaker without headphones (the
reply comes back 80 ms later at -6 dB with reflections; the client declares no echo
cancellation, so the server's runs); ``--headphones`` makes it quiet. Each trial asks a typed
question and waits until about a second of the reply has played, then:

* interruption: a spoken line ("Stop.", "Wait, what about Spain?" …) goes into the
  microphone. Latency = from the moment its voice went out (client clock) to the arrival of
  the last reply audio of that turn (loopback: arrival = sent). Also the moment the
  loudspeaker went quiet (adds the 200 ms the server sends ahead) and reply.interrupted.
* false interruptions: backchannels ("Yeah.", "Uh-huh." …) and noises (a 150 ms burst, a
  clap, a cough-like burst); any reply.interrupted or new user turn counts.
* echo: no sound from the person; the loudspeaker leaks back 0, 80 or 250 ms after the
  audio arrived (the server's schedule, or a jitter buffer later) at -12, -6 or 0 dB, with
  room noise, the client declaring no echo cancellation (so the server's AEC3 runs):
  ``--echo-trials`` per condition (6: 54 in all); and 700 ms late at -6 and 0 dB, out of
  AEC3's reach, where only the decision can keep the echo from cutting the reply
  (``--delays`` picks some). A reply.interrupted or a user turn made of the reply counts
  as a self-interruption. The last row has no AEC anywhere (client claims
  it, server trusts it): the transcript checks alone.

Targets: 0 self-interruptions, >= 19 of 20 interruptions with onset -> audio stops p95 <= 300 ms.
Run it from another checkout (``cd old && python -m bench.bargein``) for a baseline: the
server is started from the working directory.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.common.acoustics import EchoRoom, live_microphone
from client.common.eventlog import TurnRecord
from client.common.ws_client import VoxlensClient
from server.launch import spawn_server
from streaming.audio import Float32Array, resample

CITIES = ["Paris", "Rome", "Madrid", "Berlin", "Vienna", "Lisbon", "Prague", "Dublin", "Oslo",
          "Athens"]
INTERRUPTIONS = ["Stop.", "Wait, what about Spain?", "No, tell me about Rome instead.",
                 "Hold on a second.", "Actually, what time is it?"]
BACKCHANNELS = ["Yeah.", "Uh-huh.", "Okay.", "Right.", "Mm-hmm.", "I see."]


def voice() -> Any:
    from piper import PiperVoice

    from pipelines.models import piper_voice
    model, config = piper_voice("joe")
    return PiperVoice.load(model, config_path=config)


def said(v: Any, text: str) -> Float32Array:
    chunks = list(v.synthesize(text))
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    return resample(audio, chunks[0].sample_rate, 16_000)


def noises() -> dict[str, Float32Array]:
    rng = np.random.default_rng(7)
    burst = rng.normal(0, 0.2, 2400).astype(np.float32)  # 150 ms
    clap = np.zeros(1600, np.float32)
    clap[:80] = rng.normal(0, 0.6, 80)
    cough = np.convolve(rng.normal(0, 0.3, 4800), np.ones(8) / 8, mode="same").astype(np.float32)
    cough *= np.hanning(cough.size).astype(np.float32)
    return {"noise burst 150 ms": burst, "clap": clap, "cough-like 300 ms": cough}


@dataclass
class Trial:
    interrupted: bool
    new_turn: bool
    latency_ms: float | None = None  # voice out → last reply audio received
    quiet_ms: float | None = None  # voice out → loudspeaker silent
    event_ms: float | None = None  # voice out → reply.interrupted


async def trial(url: str, question: str, sound: Float32Array | None, room: EchoRoom,
                client_aec: bool, *, wait_after_s: float = 3.0) -> Trial:
    async with VoxlensClient(url) as client:
        await client.start(language="en", audio={"echo_cancellation": client_aec})
        mic = asyncio.create_task(live_microphone(client, room))
        try:
            await client.say(question)
            await client.wait_for(lambda: any(t.audio for t in client.turns.values()), 120)
            reply = next(t for t in client.turns.values() if t.audio)
            while not reply.done and reply.interrupted is None and not (  # noqa: ASYNC110
                    client.played_ms(reply.turn_id) >= 1000 and unplayed_ms(client, reply) >= 100):
                await asyncio.sleep(0.02)  # a second heard, and audio flowing (not between chunks)
            if sound is not None:
                room.say(sound)
            if sound is None or reply.interrupted is None:
                await finish(client, reply, wait_after_s)
        finally:
            mic.cancel()
            await asyncio.gather(mic, return_exceptions=True)
    new_turn = any(e["type"] == "transcript" and e["final"] and e["turn_id"] > reply.turn_id
                   for e in client.events)
    out = Trial(reply.interrupted is not None, new_turn)
    if reply.interrupted is not None and room.voice_at is not None:
        assert reply.last_audio_at is not None
        # 0 when no reply audio came after the voice (the reply was between two chunks)
        out.latency_ms = max(0.0, (reply.last_audio_at - room.voice_at) * 1000)
        i = next(k for k, e in enumerate(client.events) if e["type"] == "reply.interrupted")
        cut_at = client.arrivals[i]
        out.event_ms = (cut_at - room.voice_at) * 1000
        # the next reply's audio only comes after reply.interrupted
        loud = [t for t, on in room.speaker_on if on and t <= cut_at]
        out.quiet_ms = max(0.0, (max(loud) - room.voice_at) * 1000 + 20)
    return out


async def finish(client: VoxlensClient, reply: TurnRecord, wait_after_s: float) -> None:
    """Until the reply is interrupted, or has played out and ``wait_after_s`` more passed."""
    deadline = None
    while reply.interrupted is None:
        playing = not reply.done or client.played_ms(reply.turn_id) < len(reply.audio) / 48
        if not playing and deadline is None:
            deadline = time.monotonic() + wait_after_s
        if deadline is not None and time.monotonic() > deadline:
            return
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)


def unplayed_ms(client: VoxlensClient, reply: TurnRecord) -> float:
    return len(reply.audio) / 48 - client.played_ms(reply.turn_id)


def nan(x: float | None) -> float:
    return float("nan") if x is None else x


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q * 100)) if xs else float("nan")


def speaker_room(headphones: bool, seed: int = 0) -> EchoRoom:
    """The room of the interruption and false-interruption trials."""
    if headphones:
        return EchoRoom(24_000, gain_db=-90)  # nothing leaks back
    return EchoRoom(24_000, delay_ms=80, gain_db=-6, noise_db=-50, seed=seed)


async def main_async(trials: int, parts: set[str], echo_trials: int, headphones: bool,
                     delays: set[int]) -> None:
    v = voice()
    server = spawn_server(Path("bench/results/bargein.log"))
    client_aec = headphones  # a speaker declares no echo cancellation: the server's runs
    try:
        print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; server default "
              "settings (whisper base, qwen2.5-0.5b, piper joe)\n")
        lines = [said(v, t) for t in INTERRUPTIONS]
        results = []
        print(f"room: {'headphones' if headphones else 'speaker, 80 ms, -6 dB, server AEC'}")
        for k in range(trials if "interrupt" in parts else 0):
            r = await trial(server.ws, f"Tell me about {CITIES[k % len(CITIES)]}.",
                            lines[k % len(lines)], speaker_room(headphones, k), client_aec)
            results.append(r)
            print(f"  interruption {k + 1:2d}: interrupted={r.interrupted} "
                  f"last audio {nan(r.latency_ms):6.0f} ms, loudspeaker quiet "
                  f"{nan(r.quiet_ms):6.0f} ms, event {nan(r.event_ms):6.0f} ms", flush=True)
        lat = [r.latency_ms for r in results if r.latency_ms is not None]
        quiet_ms = [r.quiet_ms for r in results if r.quiet_ms is not None]
        ev = [r.event_ms for r in results if r.event_ms is not None]
        print(f"\ninterruption ({len(results)} trials, {sum(r.interrupted for r in results)} "
              f"interrupted): onset → last reply audio p50 {pct(lat, .5):.0f} ms, p95 "
              f"{pct(lat, .95):.0f} ms (target <= 300); loudspeaker quiet p50 "
              f"{pct(quiet_ms, .5):.0f} / p95 {pct(quiet_ms, .95):.0f} ms; reply.interrupted "
              f"p50 {pct(ev, .5):.0f} / p95 {pct(ev, .95):.0f} ms")

        sounds = {t: said(v, t) for t in BACKCHANNELS} | noises() if "false" in parts else {}
        false = 0
        for k, (name, sound) in enumerate(sounds.items()):
            r = await trial(server.ws, f"Tell me about {CITIES[k % len(CITIES)]}.", sound,
                            speaker_room(headphones, k), client_aec)
            false += r.interrupted or r.new_turn
            print(f"  {name:20s}: interrupted={r.interrupted} new turn={r.new_turn}", flush=True)
        print(f"\nfalse interruptions: {false} of {len(sounds)}")

        print("\nself-interruption under echo (room noise -50 dBFS, reflections; delay after "
              "the audio arrived):")
        print(f"{'delay ms':>8} {'level dB':>8} {'AEC':>7} {'trials':>6} {'self-interruptions':>18}")
        conditions = [(d, g, False) for d in (0, 80, 250) for g in (-12, -6, 0)
                      if "echo" in parts and d in delays]
        # a loudspeaker 700 ms late (Bluetooth): out of AEC3's reach, the echo passes whole
        conditions += [(700, g, False) for g in (-6, 0) if "echo" in parts and 700 in delays]
        if "no-aec" in parts:
            conditions.append((80, -6, True))
        total = bad_total = 0
        for delay, gain, no_aec in conditions:
            n = echo_trials if not no_aec else 2
            bad = 0
            for k in range(n):
                room = EchoRoom(24_000, delay_ms=delay, gain_db=gain, noise_db=-50, seed=k)
                r = await trial(server.ws, f"Tell me about {CITIES[(k + delay) % len(CITIES)]} "
                                "in two sentences.", None, room, no_aec)
                bad += r.interrupted or r.new_turn
            if not no_aec:
                total, bad_total = total + n, bad_total + bad
            print(f"{delay:8d} {gain:8d} {'none' if no_aec else 'server':>7} {n:6d} {bad:18d}",
                  flush=True)
        if total:
            print(f"\nself-interruptions with the server's AEC: {bad_total} of {total} "
                  "(target 0)")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--parts", default="interrupt,false,echo,no-aec",
                        help="comma-separated: interrupt, false, echo, no-aec")
    parser.add_argument("--echo-trials", type=int, default=6, help="echo trials per condition")
    parser.add_argument("--delays", default="0,80,250,700",
                        help="echo trials: the loudspeaker's delays after arrival, ms")
    parser.add_argument("--headphones", action="store_true",
                        help="interruptions and false interruptions in a quiet room")
    args = parser.parse_args()
    t0 = time.monotonic()
    asyncio.run(main_async(args.trials, set(args.parts.split(",")), args.echo_trials,
                           args.headphones, {int(d) for d in args.delays.split(",")}))
    print(f"\n(took {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
