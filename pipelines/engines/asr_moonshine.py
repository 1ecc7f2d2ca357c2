"""English ASR with Moonshine tiny (Useful Sensors, MIT) through plain onnxruntime.

Moonshine reads raw 16 kHz audio (no log-mel, no 30 s window: its cost grows with the
audio, not a fixed window), so a short question costs a fraction of Whisper base's
time (MODELS.md: ~70 ms against ~260 ms on 2 cores). It is English only. The model is
an encoder and a merged decoder (one graph with and without its key/value cache,
chosen by ``use_cache_branch``), decoded greedily from the start token 1 to the end
token 2, at most ``TOKENS_PER_S`` tokens per second of audio (a loop guard). The
``.ort`` files come out of the ``moonshine-voice`` 0.1.0 wheel and the tokenizer out
of ``useful-moonshine-onnx`` (pipelines/models.py); ``tokenizers`` decodes.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from pipelines.compute import Compute, Priority
from pipelines.engines.base import AsrResult
from streaming.audio import MODEL_RATE, Float32Array

START, END = 1, 2
TOKENS_PER_S = 6.5
MIN_AUDIO_S = 0.1  # the encoder's convolutions need this much


class MoonshineAsr:
    def __init__(self, model_dir: Path, compute: Compute, *, threads: int = 2,
                 name: str = "moonshine:tiny-en") -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # its idle threads must not spin: the cores are shared with Whisper, the LLM and TTS
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._encoder = ort.InferenceSession(str(model_dir / "encoder_model.ort"),
                                             sess_options=opts,
                                             providers=["CPUExecutionProvider"])
        self._decoder = ort.InferenceSession(str(model_dir / "decoder_model_merged.ort"),
                                             sess_options=opts,
                                             providers=["CPUExecutionProvider"])
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._cache_inputs = [i for i in self._decoder.get_inputs()
                              if i.name.startswith("past_key_values.")]
        self._outputs = [o.name for o in self._decoder.get_outputs()]
        self._compute = compute
        self.name = name

    async def transcribe(self, audio: Float32Array, *, language: str | None,
                         priority: Priority, session: str | None = None,
                         key: Hashable | None = None) -> AsrResult:
        """English only: ``language`` is not consulted (the router picks this engine for
        English, pipelines/engines/asr_routed.py)."""
        return await self._compute.call("asr", priority, self.run, audio, session=session,
                                        key=key)

    def run(self, audio: Float32Array) -> AsrResult:
        """Model work (blocking)."""
        if audio.size < MIN_AUDIO_S * MODEL_RATE:
            audio = np.pad(audio, (0, int(MIN_AUDIO_S * MODEL_RATE) - audio.size))
        x = audio.astype(np.float32)[None]
        mask = np.ones(x.shape, np.int64)  # over the audio's samples, for both graphs (the
        (hidden,) = self._encoder.run(None, {"input_values": x, "attention_mask": mask})
        feeds: dict[str, np.ndarray] = {  # decoder downsamples it; one per hidden frame fails
            "encoder_hidden_states": hidden,  # past 9 s)
            "encoder_attention_mask": mask,
        }
        for i in self._cache_inputs:  # empty caches for the first step
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        tokens: list[int] = []
        logprobs: list[float] = []
        token = START
        for step in range(max(1, int(audio.size / MODEL_RATE * TOKENS_PER_S))):
            feeds["input_ids"] = np.array([[token]], np.int64)
            feeds["use_cache_branch"] = np.array([step > 0])
            out = dict(zip(self._outputs, self._decoder.run(None, feeds), strict=True))
            last = out["logits"][0, -1].astype(np.float64)
            token = int(np.argmax(last))
            logprobs.append(float(last[token] - np.log(np.exp(last - last.max()).sum())
                                  - last.max()))
            if token == END:
                break
            tokens.append(token)
            for i in self._cache_inputs:  # the encoder's cache is computed once, at step 0
                if ".decoder." in i.name or step == 0:
                    feeds[i.name] = out[i.name.replace("past_key_values.", "present.")]
        text = self._tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return AsrResult(text, "en", 0.0, float(np.mean(logprobs)) if logprobs else 0.0)

    def warm_up(self) -> None:
        self.run(np.zeros(MODEL_RATE, dtype=np.float32))
