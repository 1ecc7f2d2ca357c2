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

    .venv/bin/python -m bench.concurrency --nodes 1 2 [--sessions 2 4 8] [--seconds 45] [--camera]

With ``--nodes``, the same load goes through HAProxy (deploy/haproxy.cfg, as
tests/e2e/test_topology.py runs it) to 1 or 2 nodes on this machine, scheduler
only, camera off unless ``--camera``: the sessions held at p95 <= 1.5 s per
node count. All the while a probe measures what the balancer itself adds: the
round trip of a WebSocket ping to the same node, directly and through HAProxy,
interleaved (every audio frame and every reply chunk crosses the balancer
once, so voice-to-voice pays about one such round trip).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from bench.latency import QUESTIONS, pct
from client.common.wavio import last_voiced_sample
from client.common.ws_client import VoxlensClient
from server.launch import Fleet, ServerProcess, spawn_fleet, spawn_server
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


def node_env(fifo: bool) -> dict[str, str]:
    return {"VOXLENS_SERVER__MAX_SESSIONS": "64", "VOXLENS_SCHEDULER__ADMISSION_WAIT_MS": "1e9",
            "VOXLENS_SCHEDULER__FIFO": "true" if fifo else "false",
            # every simulated person comes from 127.0.0.1: one client to the per-client limits
            "VOXLENS_LIMITS__SESSIONS_PER_CLIENT": "0", "VOXLENS_LIMITS__CONNECTIONS_PER_MINUTE": "0"}


async def run_load(url: str, n: int, seconds: float, utterances: list[Float32Array],
                   frames: list[str] | None, nodes: list[ServerProcess]) -> dict[str, float]:
    """N clients on ``url`` for ``seconds``; the figures, with the CPU and stale work of
    ``nodes`` (summed)."""
    figures = Figures()
    cpu0, t0 = sum(cpu_seconds(node.proc.pid) for node in nodes), time.monotonic()
    await asyncio.gather(*(one_client(url, i * PERIOD_S / n, seconds, utterances, figures, frames)
                           for i in range(n)))
    cpu = (sum(cpu_seconds(node.proc.pid) for node in nodes) - cpu0) / (time.monotonic() - t0)
    stale = sum([await stale_count(node.http) for node in nodes])
    v2v = figures.v2v_ms + [seconds * 1000] * figures.missed
    lag = figures.partial_lag_ms or [float("nan")]
    return {"n": n, "turns": len(v2v), "missed": figures.missed, "p50": pct(v2v, .5),
            "p95": pct(v2v, .95), "lag50": statistics.median(lag), "lag95": pct(lag, .95),
            "stale": stale, "cpu": cpu * 100}


async def run_n(n: int, seconds: float, utterances: list[Float32Array], fifo: bool,
                frames: list[str] | None) -> dict[str, float]:
    name = f"concurrency-{n}-{'fifo' if fifo else 'policy'}-{'camera' if frames else 'blind'}"
    server = spawn_server(Path(f"bench/results/{name}.log"), env=node_env(fifo))
    try:
        return await run_load(server.ws, n, seconds, utterances, frames, [server])
    finally:
        server.stop()


class RoundTrips:
    """Owns two idle WebSocket sessions on the same node, one through the balancer and one
    direct, and times ping → pong on both, alternately (the node's event loop answers both:
    the difference is the balancer's)."""

    def __init__(self) -> None:
        self.http = aiohttp.ClientSession()
        self.sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}
        self.ms: dict[str, list[float]] = {"direct": [], "balancer": []}

    async def open(self, fleet: Fleet) -> None:
        """Through the balancer first, then straight to the node it chose (before the load,
        so that node is the only one holding a session)."""
        self.sockets["balancer"] = await self._connect(fleet.ws)
        for node in fleet.nodes:
            async with self.http.get(f"{node.http}/healthz") as r:
                if (await r.json())["sessions"] == 1:
                    self.sockets["direct"] = await self._connect(node.ws)
                    return
        raise RuntimeError("the balancer's probe session is on no node")

    async def _connect(self, url: str) -> aiohttp.ClientWebSocketResponse:
        ws = await self.http.ws_connect(url, autoping=False)
        while True:  # its session is ready
            msg = await ws.receive(timeout=60)
            if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data).get("type") == \
                    "session.ready":
                return ws
            if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                raise ConnectionError(f"{url}: {msg.type.name} before session.ready")

    async def _once(self, path: str) -> None:
        ws = self.sockets[path]
        start = time.perf_counter()
        await ws.ping()
        while True:
            msg = await ws.receive(timeout=30)
            if msg.type == aiohttp.WSMsgType.PONG:
                self.ms[path].append((time.perf_counter() - start) * 1000)
                return
            if msg.type == aiohttp.WSMsgType.PING:  # the node's heartbeat
                await ws.pong(msg.data)
            elif msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                raise ConnectionError(f"probe ({path}): {msg.type.name}")

    async def run(self, every_s: float = 0.1) -> None:
        """Until cancelled: a round trip on each path in turn, the order alternating."""
        k = 0
        while True:
            order = ("direct", "balancer") if k % 2 == 0 else ("balancer", "direct")
            for path in order:
                await self._once(path)
            k += 1
            await asyncio.sleep(every_s)

    async def close(self) -> None:
        for ws in self.sockets.values():
            await ws.close()
        await self.http.close()


async def run_fleet(nodes: int, n: int, seconds: float, utterances: list[Float32Array],
                    frames: list[str] | None) -> dict[str, float]:
    """N clients through HAProxy to ``nodes`` nodes, with the balancer's round-trip probe."""
    logs = Path(f"bench/results/concurrency-nodes{nodes}-{n}-{'camera' if frames else 'blind'}")
    # the probe's sessions send no audio: no idle timeout closes them in a long run
    fleet = spawn_fleet(nodes, logs, env={**node_env(False), "VOXLENS_LIMITS__IDLE_TIMEOUT_S": "0"})
    probe = RoundTrips()
    try:
        await probe.open(fleet)
        probing = asyncio.create_task(probe.run())
        lb_cpu0, t0 = cpu_seconds(fleet.balancer.proc.pid), time.monotonic()
        try:
            row = await run_load(fleet.ws, n, seconds, utterances, frames, fleet.nodes)
        finally:
            probing.cancel()
            (ended,) = await asyncio.gather(probing, return_exceptions=True)
            if not isinstance(ended, asyncio.CancelledError):  # it stopped by itself: say why
                print(f"  the round-trip probe stopped early: {ended!r}", flush=True)
        lb_cpu = (cpu_seconds(fleet.balancer.proc.pid) - lb_cpu0) / (time.monotonic() - t0)
    finally:
        await probe.close()
        fleet.stop()
    direct, via = probe.ms["direct"] or [float("nan")], probe.ms["balancer"] or [float("nan")]
    return {**row, "nodes": nodes, "rtt_direct": statistics.median(direct),
            "rtt_balancer": statistics.median(via), "rtt_pairs": min(len(direct), len(via)),
            "lb_cpu": lb_cpu * 100}


def table(title: str, rows: list[dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"{'N':>3} {'turns':>5} {'missed':>6} {'p50 ms':>7} {'p95 ms':>7} {'partial lag p50/p95 ms':>23}"
          f" {'stale':>6} {'CPU %':>6}")
    for r in rows:
        print(f"{r['n']:3.0f} {r['turns']:5.0f} {r['missed']:6.0f} {r['p50']:7.0f} {r['p95']:7.0f} "
              f"{r['lag50']:11.0f} / {r['lag95']:<9.0f} {r['stale']:6.0f} {r['cpu']:6.0f}")
    ok = [r["n"] for r in rows if r["p95"] <= TARGET_P95_MS]
    print(f"largest N with p95 <= {TARGET_P95_MS:.0f} ms: {max(ok) if ok else 'none'}")


def spoken_questions() -> list[Float32Array]:
    """The benchmark's questions in piper's voice, at 16 kHz."""
    from piper import PiperVoice

    from pipelines.models import piper_voice

    model, config = piper_voice("joe")
    voice = PiperVoice.load(model, config_path=config)
    utterances = []
    for q in QUESTIONS:
        chunks = list(voice.synthesize(q))
        audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        utterances.append(resample(audio, chunks[0].sample_rate, 16000))
    return utterances


def camera_frames() -> list[str]:
    """Four photos as base64 JPEG, the camera's scenes."""
    from skimage import data as photos

    from streaming.images import encode_jpeg

    return [base64.b64encode(encode_jpeg(p)).decode()
            for p in (photos.chelsea(), photos.coffee(), photos.astronaut(), photos.rocket())]


async def main_nodes(node_counts: list[int], sessions: list[int], seconds: float,
                     camera: bool) -> None:
    utterances = spoken_questions()
    frames = camera_frames() if camera else None
    results: dict[int, list[dict[str, float]]] = {nodes: [] for nodes in node_counts}
    for nodes in node_counts:
        for n in sessions:
            row = await run_fleet(nodes, n, seconds, utterances, frames)
            results[nodes].append(row)
            added = row["rtt_balancer"] - row["rtt_direct"]
            print(f"  {nodes} node(s), N={n}: p50 {row['p50']:.0f} ms, p95 {row['p95']:.0f} ms, "
                  f"missed {row['missed']:.0f}; the balancer adds {added:.2f} ms per round trip "
                  "(p50)", flush=True)
    print(f"\n{os.cpu_count()} cores shared by every node; each client asks every {PERIOD_S:.0f} s "
          f"for {seconds:.0f} s; camera {'on' if camera else 'off'}; through HAProxy "
          "(deploy/haproxy.cfg)")
    for nodes, rows in results.items():
        table(f"{nodes} node(s) behind HAProxy", rows)
    print("\nthe balancer's own latency: WebSocket ping round trip to the same node, p50 ms")
    print(f"{'nodes':>5} {'N':>3} {'direct':>7} {'HAProxy':>8} {'added':>6} {'pairs':>6} "
          f"{'HAProxy CPU %':>14}")
    for nodes, rows in results.items():
        for r in rows:
            print(f"{nodes:5d} {r['n']:3.0f} {r['rtt_direct']:7.2f} {r['rtt_balancer']:8.2f} "
                  f"{r['rtt_balancer'] - r['rtt_direct']:6.2f} {r['rtt_pairs']:6.0f} {r['lb_cpu']:14.1f}")
    held = {nodes: max((r["n"] for r in rows if r["p95"] <= TARGET_P95_MS), default=None)
            for nodes, rows in results.items()}
    print("\nsessions held at p95 <= 1.5 s: " + ", ".join(
        f"{nodes} node(s): {'none' if h is None else f'{h:.0f}'}" for nodes, h in held.items()))


async def main_async(sessions: list[int], seconds: float) -> None:
    utterances = spoken_questions()
    frames = camera_frames()
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
    parser.add_argument("--nodes", type=int, nargs="+", choices=[1, 2], metavar="{1,2}",
                        help="through HAProxy to this many nodes (deploy/haproxy.cfg balances "
                        "one or two), scheduler only")
    parser.add_argument("--camera", action="store_true", help="--nodes: camera on (a frame a "
                        "second)")
    args = parser.parse_args()
    if args.camera and not args.nodes:
        parser.error("--camera goes with --nodes (without it the camera runs on and off)")
    if args.nodes:
        asyncio.run(main_nodes(args.nodes, args.sessions, args.seconds, args.camera))
    else:
        asyncio.run(main_async(args.sessions, args.seconds))


if __name__ == "__main__":
    main()
