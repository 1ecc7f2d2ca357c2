"""End of turn from the sound of speech: pipecat's smart-turn v3.2 through onnxruntime.

smart-turn (BSD-2-clause, Daily) is a Whisper-tiny encoder with a classifier that
tells from the last <= 8 s of 16 kHz audio whether the speaker has finished their
turn: intonation, pace, an unfinished phrase. Its published input contract: the
audio's last 8 s, left-padded with zeros when shorter, normalised to zero mean and
unit variance, as Whisper's 80-bin log-mel spectrogram over an 8 s window (800
frames); it returns the probability that the turn is complete. It is meant to run
once the voice detector hears silence, which is when the listener asks it.

The model file is read out of the ``pipecat-ai`` wheel by ``voxlens models``
(pipelines/models.py); the features come from faster-whisper's extractor (the
same Whisper front end the ASR uses).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from faster_whisper.feature_extractor import FeatureExtractor

from pipelines.compute import Compute, Priority
from streaming.audio import MODEL_RATE, Float32Array

WINDOW_S = 8


class SmartTurn:
    name = "smart-turn-v3.2"

    def __init__(self, model_path: Path, compute: Compute, *, threads: int = 1) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(model_path), sess_options=opts,
                                             providers=["CPUExecutionProvider"])
        self._features = FeatureExtractor(feature_size=80, chunk_length=WINDOW_S)
        self._compute = compute

    async def complete(self, audio: Float32Array, *, session: str | None = None) -> float:
        """The probability that the utterance (16 kHz mono, its end being now) is a finished
        turn. Runs on its own ``turn`` lane at the final transcript's priority: it decides
        when the reply may start, and must not queue behind a partial transcript."""
        return await self._compute.call("turn", Priority.ASR_FINAL, self.probability, audio,
                                        session=session)

    def probability(self, audio: Float32Array) -> float:
        """Model work (blocking)."""
        n = WINDOW_S * MODEL_RATE
        x = audio[-n:].astype(np.float32)
        x = np.pad(x, (n - x.size, 0))
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        mel = self._features(x, padding=0)[:, :n // 160]  # 80 x 800
        (out,) = self._session.run(None, {"input_features": mel[None].astype(np.float32)})
        return float(np.asarray(out).reshape(-1)[0])

    def warm_up(self) -> None:
        self.probability(np.zeros(MODEL_RATE, dtype=np.float32))
