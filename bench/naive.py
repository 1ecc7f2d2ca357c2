"""The naive cascade baseline: the same models, one stage after the other.

Waits for the endpoint (same VAD and segmenter settings), transcribes the whole
utterance, generates the whole answer, synthesizes it whole, then sends it.
It speaks the same wire protocol through the same WebSocket adapter, so the
client measures both designs the same way.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from pipelines.compute import Priority
from pipelines.engines.base import Asr, ChatMessage
from pipelines.prompt import LANGUAGE_HINTS, fixed_system_prompt
from pipelines.segmenter import End, Segmenter
from pipelines.session import Engines, SessionConfig
from streaming.audio import Float32Array, float_to_pcm16, resample
from streaming.channels import Channel
from streaming.events import (
    AudioFormat,
    Event,
    Metrics,
    ReplyDone,
    ReplyStarted,
    ReplyText,
    SessionReady,
    Transcript,
)
from streaming.playout import Playout


class NaiveSession:
    def __init__(self, session_id: str, engines: Engines, config: SessionConfig,
                 asr: Asr | None = None) -> None:
        self.session_id = session_id
        self.engines = engines
        self.asr = asr or engines.asr
        self.config = config
        self.events: Channel[Event] = Channel(512)
        # the whole reply goes in at once (no room taken); reply.done follows its last audio
        self.playout = Playout(config.output_rate, release=self.events.put_nowait)
        self._vad = engines.vad.new_stream()
        self._seg = Segmenter(config.listener.segmenter, engines.vad.frame_samples)
        self._pending = np.zeros(0, dtype=np.float32)
        self._ends: Channel[tuple[Float32Array, float]] = Channel(8)
        self._stop = asyncio.Event()
        self._last_voiced = 0.0
        self._turn = 0

    def ready_event(self) -> SessionReady:
        return SessionReady(self.session_id, AudioFormat(16000), AudioFormat(self.config.output_rate),
                            {"mode": "naive cascade"})

    def configure(self, **_: object) -> None:
        pass

    def submit_text(self, text: str) -> None:
        raise NotImplementedError("the naive baseline takes speech only")

    def attach_echo(self, meter: object) -> None:
        pass  # no barge-in: the baseline talks until it is done

    def interrupt(self) -> None:
        pass

    def playback(self, played_ms: int, turn_id: int | None) -> None:
        pass

    def close(self) -> None:
        self._stop.set()

    async def push_audio(self, audio: Float32Array) -> None:
        self._pending = np.concatenate([self._pending, audio])
        f = self.engines.vad.frame_samples
        while self._pending.size >= f:
            frame, self._pending = self._pending[:f], self._pending[f:]
            prob = self._vad(frame)
            if prob >= self.config.listener.segmenter.threshold:
                self._last_voiced = time.monotonic()
            for ev in self._seg.push(frame, prob):
                if isinstance(ev, End):
                    await self._ends.put((ev.audio, self._last_voiced))

    async def run(self) -> None:
        worker = asyncio.create_task(self._work())
        await self._stop.wait()
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        self.events.close()

    async def _work(self) -> None:
        e = self.engines
        async for audio, speech_end in self._ends:
            self._turn += 1
            turn = self._turn
            heard = await self.asr.transcribe(audio, language=self.config.language,
                                           priority=Priority.ASR_FINAL)
            t_asr = time.monotonic()
            await self.events.put(Transcript(turn, heard.text, True, heard.language))
            system = fixed_system_prompt(self.config.system_prompt, vision=e.vlm is not None)
            said = heard.text  # the same reminder of the language as voxlens's prompt
            if heard.language in LANGUAGE_HINTS:
                said = f"{said}\n{LANGUAGE_HINTS[heard.language]}"
            messages = [ChatMessage("system", system), ChatMessage("user", said)]
            text = "".join([d async for d in e.llm.stream(messages,
                                                          max_tokens=self.config.turn.max_tokens)])
            t_llm = time.monotonic()
            audio_out = await e.tts.synthesize(text, priority=Priority.TTS_FIRST,
                                               language=heard.language)
            t_tts = time.monotonic()
            pcm = float_to_pcm16(resample(audio_out, e.tts.sample_rate, self.config.output_rate))
            await self.events.put(ReplyStarted(turn))
            await self.events.put(ReplyText(turn, text))
            self.playout.put(turn, pcm)
            t_sent = time.monotonic()
            ms = {k: (v - speech_end) * 1000 for k, v in
                  {"transcript_final": t_asr, "llm_done": t_llm, "tts_done": t_tts,
                   "first_audio_sent": t_sent}.items()}
            for event in (ReplyDone(turn, text), Metrics(turn, ms)):
                if not self.playout.after_audio(turn, event):
                    await self.events.put(event)
