"""Vision figures: inference time per frame, frames inspected vs received, and what the camera
costs a voice turn.

    .venv/bin/python -m bench.vision [--seconds 60] [--turns 10]

1. The scene engine's time per frame on the four scikit-image photos.
2. A camera at 10 fps for ``--seconds`` into a session's looker (real engine, real time): a
   static scene (one photo plus sensor noise) and a changing one (the photo changes every
   5 s): frames received vs frames inspected.
3. Voice-to-voice at the client over WebSocket, camera off vs on (a frame a second, the scene
   changing every 10 s), same spoken questions: p50/p95 and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import time
from pathlib import Path

import numpy as np
from skimage import data as photos

from bench.latency import QUESTIONS, pct
from client.common.ws_client import VoxlensClient
from pipelines import models
from pipelines.compute import Compute
from pipelines.engines.vlm_scene import SceneVlm
from pipelines.vision import Looker, VisionConfig
from server.launch import spawn_server
from streaming.images import encode_jpeg

PHOTOS = [photos.chelsea(), photos.coffee(), photos.astronaut(), photos.rocket()]


def noisy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image.astype(np.int16) + rng.integers(-3, 4, image.shape), 0, 255).astype(
        np.uint8)


def per_frame(vlm: SceneVlm) -> None:
    vlm.warm_up()
    times = []
    for _ in range(5):
        for image in PHOTOS:
            t = time.perf_counter()
            vlm.describe(image)
            times.append((time.perf_counter() - t) * 1000)
    print(f"scene engine, 1 thread: median {statistics.median(times):.0f} ms, "
          f"p95 {pct(times, .95):.0f} ms per frame ({len(times)} frames)")


async def stream(vlm: SceneVlm, seconds: float, changing: bool) -> tuple[int, int]:
    rng = np.random.default_rng(0)
    looker = Looker(vlm, VisionConfig(), lambda scene: None)
    runner = asyncio.create_task(looker.run())
    received = 0
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        photo = PHOTOS[int(elapsed // 5) % len(PHOTOS)] if changing else PHOTOS[0]
        looker.push(noisy(photo, rng))
        received += 1
        await asyncio.sleep(0.1)
    runner.cancel()
    return received, looker.looks


async def voice_turns(turns: int, camera: bool) -> list[float]:
    from piper import PiperVoice

    model, config = models.piper_voice("joe")
    voice = PiperVoice.load(model, config_path=config)
    server = spawn_server(Path(f"bench/results/vision-camera-{'on' if camera else 'off'}.log"))
    results: list[float] = []
    rng = np.random.default_rng(1)
    try:
        async with VoxlensClient(server.ws) as client:
            async def camera_feed() -> None:
                k = 0
                while True:
                    image = noisy(PHOTOS[(k // 10) % len(PHOTOS)], rng)
                    await client.send({"type": "image",
                                       "data": base64.b64encode(encode_jpeg(image)).decode()})
                    k += 1
                    await asyncio.sleep(1.0)

            feeder = asyncio.create_task(camera_feed()) if camera else None
            for q in (QUESTIONS * 2)[:turns]:
                chunks = list(voice.synthesize(q))
                audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
                voiced = await client.stream_audio(audio, chunks[0].sample_rate,
                                                   trailing_silence_ms=1500)
                reply = await client.wait_reply(timeout_s=60)
                assert reply.first_audio_at is not None
                results.append((reply.first_audio_at - voiced) * 1000)
            if feeder is not None:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
    finally:
        server.stop()
    return results


async def main_async(seconds: float, turns: int) -> None:
    compute = Compute()
    vlm = SceneVlm(compute, models.efficientnet_weights(),
                   models.imagenet_labels(models.default_cache_dir()))
    per_frame(vlm)
    for changing in (False, True):
        received, looked = await stream(vlm, seconds, changing)
        kind = "changing scene (new photo every 5 s)" if changing else "static scene"
        print(f"{kind}: {received} frames received in {seconds:.0f} s, {looked} inspected")
    compute.close()
    off = await voice_turns(turns, camera=False)
    on = await voice_turns(turns, camera=True)
    print(f"\nvoice-to-voice at the client, {turns} spoken turns each:")
    print(f"  camera off: p50 {pct(off, .5):.0f} ms, p95 {pct(off, .95):.0f} ms")
    print(f"  camera on (a frame a second): p50 {pct(on, .5):.0f} ms, p95 {pct(on, .95):.0f} ms")
    print(f"  on / off: p50 {pct(on, .5) / pct(off, .5):.2f}x, p95 {pct(on, .95) / pct(off, .95):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--turns", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main_async(args.seconds, args.turns))


if __name__ == "__main__":
    main()
