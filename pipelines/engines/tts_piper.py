"""Piper TTS (VITS through onnxruntime)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from piper import PiperVoice
from piper.config import PiperConfig

from pipelines.compute import Compute, Priority
from streaming.audio import Float32Array
from streaming.errors import EngineError


class PiperTts:
    def __init__(self, model_path: Path, config_path: Path, compute: Compute, *, threads: int = 1,
                 name: str | None = None) -> None:
        self.name = name or f"piper:{model_path.stem}"
        self._compute = compute
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(model_path), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
        config = PiperConfig.from_dict(json.loads(config_path.read_text("utf-8")))
        # no Arabic diacritizer: it would load another model we do not ship
        self._voice = PiperVoice(session=session, config=config, use_tashkeel=False)
        self.sample_rate: int = config.sample_rate

    def warm_up(self) -> None:
        self._run("Hello.")

    async def synthesize(self, text: str, *, priority: Priority, session: str | None = None,
                         language: str | None = None) -> Float32Array:
        return await self._compute.call("tts", priority, self._run, text, session=session)

    def _run(self, text: str) -> Float32Array:
        try:
            parts = [c.audio_float_array for c in self._voice.synthesize(text)]
        except Exception as e:
            raise EngineError(f"piper failed: {e}") from e
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)
