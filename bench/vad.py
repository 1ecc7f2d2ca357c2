"""Cost of one Silero VAD frame (512 samples = 32 ms) on one thread: why it runs inline.

    .venv/bin/python -m bench.vad
"""

from __future__ import annotations

import time

import numpy as np

from pipelines import models
from pipelines.engines.vad_silero import SileroVad


def main() -> None:
    vad = SileroVad(models.silero_vad_path(), threads=1)
    stream = vad.new_stream()
    rng = np.random.default_rng(0)
    frames = [(rng.standard_normal(512) * 0.1).astype(np.float32) for _ in range(3000)]
    for f in frames[:100]:
        stream(f)
    times = []
    for f in frames:
        t = time.perf_counter()
        stream(f)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000
    print(f"silero VAD, 1 thread, {len(ms)} frames of 32 ms: "
          f"median {np.median(ms):.3f} ms, p99 {np.percentile(ms, 99):.3f} ms, "
          f"{np.median(ms) / 32 * 100:.2f}% of real time")


if __name__ == "__main__":
    main()
