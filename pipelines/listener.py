"""Listening: audio → VAD → segmenter → streaming ASR (partials, speculative final).

Streaming ASR design (docs/ARCHITECTURE.md, "Streaming ASR"):

* Partials: while the person speaks, the utterance so far is transcribed every
  ``partial_interval_ms`` of audio at the lowest ASR priority; a partial still
  queued when the next one is due is superseded and dropped unrun.
* Speculative final: at the first silent frame after speech (the segmenter's
  Pause), the final decode of the utterance starts at once, at the highest
  priority, while the endpoint's silence window (default 500 ms) runs. If the
  person speaks again (Resume) the speculation is cancelled; if the endpoint
  comes, its result *is* the final transcript, so almost no ASR work remains
  after the endpoint. A speculative final that is ready before the endpoint is
  offered to the conversation as *tentative*, so the reply can be prepared too
  and released only at the endpoint.
* Language: with no language configured, the first partial of an utterance
  detects it; later partials and the final reuse it, so the final never pays
  for a second encoder pass.
* Whisper's hallucinations on noise ("Thank you.", "you", subtitle credits) are
  rejected (``is_hallucination``) and never become user turns.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pipelines.bargein import endpoint_silence_ms
from pipelines.compute import Dropped, Priority
from pipelines.engines.base import Asr, AsrResult, EndOfTurn, Vad
from pipelines.segmenter import End, Noise, Onset, Pause, Resume, Segmenter, SegmenterConfig, Voice
from pipelines.text import ZH_PROMPT, main_script
from pipelines.text import words as text_words
from streaming.audio import MODEL_RATE, Float32Array
from streaming.channels import Channel
from streaming.errors import VoxlensError

log = logging.getLogger(__name__)

PARTIAL_DEADLINE_S = 3.0  # a partial transcript later than this is dropped
# a transcript whose audio ends this long before the latest voiced frame is older than the
# person's last words: its endpoint rule (a question, a trailing "and") no longer applies
STALE_TEXT_MS = 250

# Whisper's favourite inventions on silence and noise, normalised (lowercase, no punctuation).
HALLUCINATIONS = frozenset({
    "you", "thank you", "thanks", "thank you very much", "thanks for watching",
    "thank you for watching", "thanks for watching and ill see you next time",
    "please subscribe", "subscribe", "bye", "bye bye", "so", "oh", "hmm", "um", "uh",
    "subtitles by the amaraorg community", "ご視聴ありがとうございました", "字幕由amaraorg社区提供",
    "请不吝点赞订阅转发打赏支持明镜与点点栏目", "продолжение следует",
    "soustitres réalisés para la communauté damaraorg", "untertitel der amaraorg community",
    # Mandarin (in simplified characters: transcripts are converted before they get here)
    "谢谢", "谢谢观看", "谢谢大家", "谢谢收看", "感谢观看", "感谢收看", "谢谢您的观看",
    "请订阅", "订阅我的频道", "字幕", "中文字幕", "字幕志愿者",
})
# Whisper given a prompt (pipelines/text.py ZH_PROMPT) sometimes returns the prompt itself
# for audio it cannot make out (heard over a reply's echo): never anyone's words
PROMPT_ECHOES = frozenset(re.sub(r"[^\w\s]", "", p) for p in ZH_PROMPT.values())


def normalise(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text.lower()).strip()


def is_hallucination(result: AsrResult, voiced_ms: int) -> bool:
    """Whether a transcript should be dropped instead of becoming a user turn."""
    norm = normalise(result.text)
    if not norm or norm in PROMPT_ECHOES:
        return True
    if result.no_speech_prob > 0.6 and result.avg_logprob < -0.8:  # Whisper's own silence rule
        return True
    if norm in HALLUCINATIONS and (voiced_ms < 1000 or result.no_speech_prob > 0.2
                                   or result.avg_logprob < -0.6):
        return True
    words = text_words(norm)  # a decoding loop: the same few words over and over
    return len(words) >= 12 and len(set(words)) <= len(words) // 4


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """Endpoint silence by what the transcript so far says (the segmenter's ``silence_ms`` is
    the normal case): shorter after a complete question, longer when the person trails off;
    and by how the speech sounded: ``complete_ms`` when the end-of-turn model, asked at the
    pause, finds the turn finished with at least ``turn_threshold`` (unless the words trail
    off: the two disagree, so the longer wait holds)."""

    adaptive: bool = True
    question_ms: int = 350
    incomplete_ms: int = 1100
    # the normal silence of Mandarin (an utterance known to be Mandarin, or Mandarin words
    # that neither ask nor trail off): its transcript comes too late for the text rules and
    # Whisper mishears the trailing word of a speaker who pauses (因为 → 英雄): 9 of 10
    # cut off at 700 ms pauses with 500 ms, 0 of 10 with 800 (bench/cutoffs.py); None: the
    # segmenter's silence_ms
    zh_statement_ms: int | None = 800
    complete_ms: int = 200
    turn_threshold: float = 0.5


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    partial_interval_ms: int = 700
    partial_min_ms: int = 400  # no partial of less speech than this
    speculative_final: bool = True


class Conversation(Protocol):
    """What the listener tells the conversation (implemented by Session)."""

    def on_voice(self, t_ms: int) -> None:
        """Voice since ``t_ms``, not yet confirmed as speech (barge-in pauses the reply)."""
        ...

    def on_noise(self, t_ms: int) -> None:
        """What ``on_voice`` announced was not speech after all."""
        ...

    def on_speech_started(self, t_ms: int) -> int:
        """Speech began; returns the turn id the utterance will carry."""
        ...

    def on_speech_stopped(self, t_ms: int) -> None: ...

    def on_partial(self, turn_id: int, text: str, language: str | None, audio_ms: int) -> None:
        """A partial transcript of the utterance up to input position ``audio_ms``."""
        ...

    def on_tentative(self, turn_id: int, text: str, language: str | None) -> None:
        """A speculative final is ready before the endpoint (may still be voided)."""
        ...

    def on_resumed(self, turn_id: int) -> None:
        """Speech resumed: the tentative transcript of this turn is void."""
        ...

    def on_final(self, turn_id: int, text: str | None, language: str | None,
                 speech_end: float) -> None:
        """The endpoint's transcript (None: nothing worth a turn). ``speech_end`` is wall time."""
        ...

    def on_error(self, error: VoxlensError) -> None: ...


@dataclass(slots=True)
class _Utterance:
    turn_id: int
    language: str | None
    partial: asyncio.Task[None] | None = None
    partial_at: int = 0  # stream sample count when the last partial was requested
    speculation: asyncio.Task[AsrResult | VoxlensError] | None = None
    judging: asyncio.Task[None] | None = None  # the end-of-turn model, asked at the pause
    finished: bool = False  # it found the turn finished (until the person speaks again)
    text_ms: int | None = None  # the endpoint silence the transcript so far asks for
    text_until: int = 0  # the stream sample its audio reached


class Listener:
    def __init__(self, vad: Vad, asr: Asr, conversation: Conversation,
                 config: ListenerConfig = ListenerConfig(), *, language: str | None = None,
                 session_id: str | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 turn: EndOfTurn | None = None) -> None:
        self.session_id = session_id
        self._turn = turn
        self._vad = vad.new_stream()
        self._frame = vad.frame_samples
        self._asr = asr
        self._conv = conversation
        self.config = config
        self.language = language
        self._clock = clock
        self._seg = Segmenter(config.segmenter, vad.frame_samples)
        self._samples = 0
        self._last_voiced = 0  # input position (samples) after the latest voiced frame
        self._last_voiced_wall = 0.0
        self._utt: _Utterance | None = None
        self._finishing: asyncio.Task[None] | None = None

    def reconfigure(self, config: ListenerConfig) -> None:
        """New settings, from the next frame on."""
        self.config = config
        self._seg.reconfigure(config.segmenter)

    @property
    def speaking(self) -> bool:
        return self._seg.speaking

    @property
    def voiced_until_ms(self) -> float:
        """Input position where the latest voiced frame ended."""
        return self._last_voiced * 1000 / MODEL_RATE

    @property
    def voicing(self) -> bool:
        """Speaking and not in a pause."""
        return self._seg.speaking and not self._seg.paused

    async def run(self, audio: Channel[Float32Array], tg: asyncio.TaskGroup) -> None:
        """Consume 16 kHz mono audio until the channel closes. Cancelling it stops listening;
        ASR tasks it started belong to ``tg`` and are cancelled with it."""
        pending = np.zeros(0, dtype=np.float32)
        async for chunk in audio:
            pending = np.concatenate([pending, chunk]) if pending.size else chunk
            n = pending.size // self._frame
            for k in range(n):
                self._frame_in(pending[k * self._frame:(k + 1) * self._frame], tg)
            pending = pending[n * self._frame:]
            self._maybe_partial(tg)

    def _frame_in(self, frame: Float32Array, tg: asyncio.TaskGroup) -> None:
        prob = self._vad(frame)  # inline: well under 1 ms (bench/README.md)
        self._samples += frame.size
        if prob >= self.config.segmenter.threshold:
            self._last_voiced_wall = self._clock()
            self._last_voiced = self._samples
        for ev in self._seg.push(frame, prob):
            match ev:
                case Voice(t_ms):
                    self._conv.on_voice(t_ms)
                case Noise(t_ms):
                    self._conv.on_noise(t_ms)
                case Onset(t_ms):
                    self._utt = _Utterance(self._conv.on_speech_started(t_ms), self.language,
                                           partial_at=self._samples)
                case Pause(_, audio, voiced_ms) if self._utt:
                    self._set_endpoint(self._utt)  # its text may be older than the last words
                    if self._turn is not None:
                        self._utt.judging = tg.create_task(self._judge_turn(self._utt, audio))
                    if self.config.speculative_final:
                        self._cancel_partial()
                        self._utt.speculation = tg.create_task(
                            self._speculate(self._utt, audio, voiced_ms))
                case Resume() if self._utt:
                    self._stop_judging(self._utt)
                    if self._utt.speculation:
                        self._utt.speculation.cancel()
                        self._utt.speculation = None
                        self._conv.on_resumed(self._utt.turn_id)
                case End(t_ms, audio, voiced_ms) if self._utt:
                    utt, self._utt = self._utt, None
                    if utt.judging is not None:  # (the segmenter has reset its silence)
                        utt.judging.cancel()
                    self._cancel_partial(utt)
                    self._conv.on_speech_stopped(t_ms)
                    self._finishing = tg.create_task(self._finish(
                        utt, audio, voiced_ms, self._last_voiced_wall, self._finishing))

    def _cancel_partial(self, utt: _Utterance | None = None) -> None:
        utt = utt or self._utt
        if utt and utt.partial and not utt.partial.done():
            utt.partial.cancel()

    def _maybe_partial(self, tg: asyncio.TaskGroup) -> None:
        utt = self._utt
        if utt is None or self._seg.paused:
            return
        due = self._samples - utt.partial_at >= self.config.partial_interval_ms * MODEL_RATE // 1000
        if not due:
            return
        audio = self._seg.audio()
        if audio.size < self.config.partial_min_ms * MODEL_RATE // 1000:
            return
        utt.partial_at = self._samples
        utt.partial = tg.create_task(self._partial(utt, audio, self._samples * 1000 // MODEL_RATE))

    async def _partial(self, utt: _Utterance, audio: Float32Array, audio_ms: int) -> None:
        """A partial transcript. A newer partial of this session supersedes it while it is
        still queued (the scheduler drops it unrun: it would be stale)."""
        try:  # asyncio.timeout, not wait_for: on Python 3.11 a cancelled wait_for can return
            async with asyncio.timeout(PARTIAL_DEADLINE_S):  # (streaming/mqtt_calls.py)
                result = await self._asr.transcribe(
                    audio, language=utt.language, priority=Priority.ASR_PARTIAL,
                    session=self.session_id, key=("partial", self.session_id))
        except TimeoutError:  # a partial this late is worth nothing (cancelling drops it)
            return
        except Dropped:
            return
        except VoxlensError as e:
            self._conv.on_error(e)
            return
        if utt.language is None:
            utt.language = result.language
        if self._utt is utt and not self._seg.paused and not is_hallucination(result, 10_000):
            self._adapt_endpoint(result.text, audio_ms * MODEL_RATE // 1000)
            self._conv.on_partial(utt.turn_id, result.text, result.language, audio_ms)

    async def _speculate(self, utt: _Utterance, audio: Float32Array,
                         voiced_ms: int) -> AsrResult | VoxlensError:
        """The final transcript of the utterance so far, or the engine's error: handed to
        ``_finish`` (a task of the group must not raise, or the whole session would end)."""
        try:
            result = await self._asr.transcribe(audio, language=utt.language,
                                                priority=Priority.ASR_FINAL,
                                                session=self.session_id)
        except VoxlensError as e:
            return e
        if self._utt is utt and self._seg.paused and not is_hallucination(result, voiced_ms):
            self._adapt_endpoint(result.text, self._last_voiced)
            self._conv.on_tentative(utt.turn_id, result.text, result.language)
        return result

    async def _judge_turn(self, utt: _Utterance, audio: Float32Array) -> None:
        """Ask the end-of-turn model whether the utterance so far sounds finished."""
        assert self._turn is not None
        try:
            p = await self._turn.complete(audio, session=self.session_id)
        except VoxlensError as e:  # the transcript's rules still end the turn
            log.warning("end-of-turn model failed (%s)", e.code)
            return
        if self._utt is utt and self._seg.paused:
            utt.finished = p >= self.config.endpoint.turn_threshold
            self._set_endpoint(utt)

    def _stop_judging(self, utt: _Utterance) -> None:
        """The person speaks again: the judgement of the pause is void."""
        if utt.judging is not None:
            utt.judging.cancel()
            utt.judging = None
        if utt.finished:
            utt.finished = False
            self._set_endpoint(utt)

    def _adapt_endpoint(self, text: str, until: int) -> None:
        """The transcript of the audio up to the stream sample ``until`` sets the silence."""
        e = self.config.endpoint
        if e.adaptive and self._utt is not None:
            self._utt.text_ms = endpoint_silence_ms(
                text, question_ms=e.question_ms, normal_ms=self._normal_ms(self._utt, text),
                incomplete_ms=e.incomplete_ms)
            self._utt.text_until = until
            self._set_endpoint(self._utt)

    def _normal_ms(self, utt: _Utterance, text: str = "") -> int:
        """The silence that ends words that neither ask nor trail off: longer for Mandarin
        (known from the session, the first partial or the words themselves) with
        ``zh_statement_ms``, from the first silent frame on: the transcript that could
        tell a pause from an end comes too late for the normal silence (Whisper base takes
        ~400 ms for a short Mandarin clip on 2 cores, bench/cutoffs.py)."""
        e = self.config.endpoint
        if e.adaptive and e.zh_statement_ms is not None and (
                utt.language == "zh" or main_script(text) == "han"):
            return e.zh_statement_ms
        return self.config.segmenter.silence_ms

    def _set_endpoint(self, utt: _Utterance) -> None:
        """The silence that ends the utterance now: the transcript's rule (else the normal
        silence), shortened to ``complete_ms`` when the utterance sounds finished and its
        words do not trail off. A transcript that ends before the person's last words
        (a partial, then more speech) says nothing about how they ended: normal silence."""
        e = self.config.endpoint
        stale = self._last_voiced - utt.text_until > STALE_TEXT_MS * MODEL_RATE // 1000
        ms = utt.text_ms if utt.text_ms is not None and not stale else self._normal_ms(utt)
        if utt.finished and ms < e.incomplete_ms:
            ms = min(ms, e.complete_ms)
        self._seg.silence_ms = ms

    async def _finish(self, utt: _Utterance, audio: Float32Array, voiced_ms: int,
                      speech_end: float, previous: asyncio.Task[None] | None) -> None:
        """Resolve an ended utterance into a final transcript, in utterance order."""
        if previous is not None:
            await asyncio.wait([previous])
        try:
            if utt.speculation is not None:
                speculated = await utt.speculation
                if isinstance(speculated, VoxlensError):
                    raise speculated
                result = speculated
            else:
                result = await self._asr.transcribe(audio, language=utt.language,
                                                    priority=Priority.ASR_FINAL,
                                                    session=self.session_id)
        except VoxlensError as e:
            self._conv.on_error(e)
            self._conv.on_final(utt.turn_id, None, None, speech_end)
            return
        text = None if is_hallucination(result, voiced_ms) else result.text
        self._conv.on_final(utt.turn_id, text, result.language, speech_end)
