"""Silero VAD through onnxruntime, with state kept per audio stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from streaming.audio import Float32Array

FRAME = 512  # samples at 16 kHz (32 ms), what the model expects
CONTEXT = 64  # samples of the previous frame the model sees again


class SileroVad:
    """One shared onnxruntime session; each stream gets its own recurrent state.

    A frame costs well under a millisecond on one thread (bench/README.md), so
    sessions call it inline on the event loop instead of paying a thread hop.
    """

    frame_samples = FRAME

    def __init__(self, model_path: Path, threads: int = 1) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(model_path), sess_options=opts,
                                             providers=["CPUExecutionProvider"])

    def new_stream(self) -> SileroVadStream:
        return SileroVadStream(self._session)


class SileroVadStream:
    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._sr = np.array(16000, dtype=np.int64)

    def __call__(self, frame: Float32Array) -> float:
        if frame.shape != (FRAME,):
            raise ValueError(f"silero VAD takes frames of {FRAME} samples, got {frame.shape}")
        frame = frame.astype(np.float32, copy=False)
        x = np.concatenate([self._context, frame])[None, :]
        out, self._state = self._session.run(None, {"input": x, "state": self._state, "sr": self._sr})
        self._context = frame[-CONTEXT:].copy()
        return float(out[0, 0])
