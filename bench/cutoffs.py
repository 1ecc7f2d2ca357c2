"""False cut-offs and endpoint delay of each endpoint policy (issue 13, point 4).

    .venv/bin/python -m bench.cutoffs [--sentences 10] [--policies fixed,rules,smart-turn]
                                      [--languages en,zh] [--pauses 300,500,700]

A person who pauses mid-sentence ("I want to go to the shop and, … buy some milk.")
must not be answered after the first half. Sentences split after a word that trails
off ("and", "because", "um", "so", "but"; in Mandarin 然后, 因为, 嗯, 所以, 但是) are
said in two halves by the packaged voices (piper for English, as bench/latency.py and
the tests say it, without piper's random variation; the Mandarin voice for Mandarin),
each half trimmed to its voice (-40 dBFS), joined by 300, 500 or 700 ms of silence and
followed by 1.5 s of it; the whole clip sits in low white noise (-60 dBFS RMS, a quiet
room; digital silence is no room). Each first half ends with a comma, so the voices
give it the level intonation of a speaker who goes on, and has no other punctuation
(the voices pause at one): the measured pause is the only one. The complete questions of
bench/latency.py (no pause) time how soon each policy ends a finished turn.

Each clip is pushed in real time (32 ms chunks) through the real ``Listener`` with a
new session's state: Silero VAD, the ASR the server builds by default, smart-turn
where the policy uses it (all built by ``server.engines.build_engines``), and the
listener configuration the server derives from its settings. A false cut-off: the
listener ended the utterance (speech.stopped) before the person finished the
sentence. Endpoint delay: input audio from the end of the voice (-40 dBFS) to the
frame that ended the utterance. Run it on an otherwise idle machine: the ASR's and
the end-of-turn model's timing decide when the endpoint silence adapts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bench.latency import QUESTIONS_ZH, english_questions, pct
from client.common.wavio import last_voiced_sample
from pipelines.compute import Compute, Priority
from pipelines.engines.base import Vad, VadStream
from pipelines.listener import Listener
from pipelines.session import Engines, SessionConfig
from pipelines.voices import Voices
from server.engines import build_engines, session_config
from server.settings import load_settings
from streaming.audio import MODEL_RATE, Float32Array, resample
from streaming.channels import Channel
from streaming.errors import VoxlensError

# (first half, ending where the speaker trails off; second half)
SPLIT_EN = [
    ("I want to go to the shop and,", "buy some milk."),
    ("I was late this morning because,", "the bus did not come."),
    ("Can you tell me um,", "what time the museum opens?"),
    ("It started to rain so,", "we stayed at home all day."),
    ("I like the red one but,", "the blue one is cheaper."),
    ("Please turn off the lights and,", "lock the front door."),
    ("We need to leave early because,", "the roads will be busy."),
    ("I was thinking um,", "maybe we could order a pizza."),
    ("The meeting ran long so,", "I missed my train."),
    ("I tried calling her but,", "she did not answer."),
]
SPLIT_ZH = [
    ("我想去商店然后，", "买一些牛奶。"),
    ("我今天迟到了因为，", "公交车一直没有来。"),
    ("你能告诉我嗯，", "博物馆几点开门吗？"),
    ("外面下雨了所以，", "我们一整天都待在家里。"),
    ("我喜欢红色的那个但是，", "蓝色的更便宜。"),
    ("请把灯关掉然后，", "把前门锁上。"),
    ("我们得早点出发因为，", "路上会很堵。"),
    ("我在想嗯，", "我们可以点一个披萨。"),
    ("会开得太久了所以，", "我错过了火车。"),
    ("我给她打了电话但是，", "她没有接。"),
]
POLICIES = {  # the server's settings for each endpoint policy
    "fixed": ("fixed 500 ms", {"adaptive": False}),
    "rules": ("rules (default)", {}),
    "smart-turn": ("rules + smart-turn", {"turn_model": "smart-turn"}),
    "zh-800": ("rules, zh 800 ms", {"zh_statement_silence_ms": 800}),
    "zh-1000": ("rules, zh 1000 ms", {"zh_statement_silence_ms": 1000}),
}
LEAD_S, TAIL_S = 0.5, 1.5  # silence before the voice and after it
NOISE_RMS = 0.001  # -60 dBFS
CHUNK = 512  # 32 ms pushed at a time


@dataclass(slots=True)
class Clip:
    language: str
    text: str
    audio: Float32Array  # 16 kHz
    pause_ms: int | None  # None: a complete question
    paused: int  # sample where the first half's voice ends (the pause begins; the voice's end)
    voice_end: int  # sample after the last voiced 10 ms


@dataclass(slots=True)
class Heard:
    """The listener's conversation: what it was told, at which input position (samples)."""

    position: Callable[[], int]
    started: list[int] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)
    finals: list[tuple[float, str | None]] = field(default_factory=list)  # (wall time, text)
    voice_end_at: float = 0.0  # wall time the chunk holding the end of the voice was pushed

    def on_voice(self, t_ms: int) -> None: ...
    def on_noise(self, t_ms: int) -> None: ...

    def on_speech_started(self, t_ms: int) -> int:
        self.started.append(self.position())
        return len(self.started)

    def on_speech_stopped(self, t_ms: int) -> None:
        self.stopped.append(self.position())

    def on_partial(self, turn_id: int, text: str, language: str | None, audio_ms: int) -> None: ...
    def on_tentative(self, turn_id: int, text: str, language: str | None) -> None: ...
    def on_resumed(self, turn_id: int) -> None: ...

    def on_final(self, turn_id: int, text: str | None, language: str | None,
                 speech_end: float) -> None:
        self.finals.append((time.monotonic(), text))

    def on_error(self, error: VoxlensError) -> None:
        print(f"  listener error: {error}", file=sys.stderr)


class CountingVad:
    """The VAD, counting the samples it has heard: where in the input each event happens."""

    def __init__(self, vad: Vad) -> None:
        self._vad = vad
        self.frame_samples = vad.frame_samples
        self.samples = 0

    def new_stream(self) -> VadStream:
        stream = self._vad.new_stream()

        def frame(frame: Float32Array) -> float:
            self.samples += frame.size
            return stream(frame)
        return frame


def voiced(audio: Float32Array, rate: int) -> Float32Array:
    """The audio from its first to its last voiced 10 ms (-40 dBFS)."""
    end = last_voiced_sample(audio, rate)
    start = audio.size - last_voiced_sample(audio[::-1].copy(), rate)
    return audio[start:end]


def clip(language: str, text: str, halves: list[Float32Array], pause_ms: int | None,
         rng: np.random.Generator) -> Clip:
    parts = [np.zeros(int(LEAD_S * MODEL_RATE), np.float32), halves[0]]
    paused = sum(p.size for p in parts)
    if pause_ms is not None:
        parts += [np.zeros(pause_ms * MODEL_RATE // 1000, np.float32), halves[1]]
    voice_end = sum(p.size for p in parts)
    audio = np.concatenate([*parts, np.zeros(int(TAIL_S * MODEL_RATE), np.float32)])
    audio += rng.normal(0, NOISE_RMS, audio.size).astype(np.float32)
    return Clip(language, text, audio, pause_ms, paused, voice_end)


async def clips(engines: Engines, languages: list[str], sentences: int,
                pauses: list[int]) -> list[Clip]:
    from piper import PiperVoice

    from pipelines.models import piper_voice
    from tests.conftest import speak

    rng = np.random.default_rng(13)
    model, config = piper_voice("joe")
    piper = PiperVoice.load(model, config_path=config)
    assert isinstance(engines.tts, Voices)
    zh = engines.tts.voices["zh"]

    async def say(language: str, text: str) -> Float32Array:
        if language == "en":
            audio, rate = speak(piper, text)
        else:
            audio, rate = await zh.synthesize(text, priority=Priority.TTS_REST), zh.sample_rate
        return voiced(resample(audio, rate, MODEL_RATE), MODEL_RATE)

    out = []
    for language in languages:
        split = (SPLIT_EN if language == "en" else SPLIT_ZH)[:sentences]
        for first, second in split:
            halves = [await say(language, first), await say(language, second)]
            out += [clip(language, f"{first} … {second}", halves, p, rng) for p in pauses]
        if language == "en":  # bench/latency.py's questions, in its voice
            questions = [(q, voiced(resample(np.asarray(a, np.float32), r, MODEL_RATE), MODEL_RATE))
                         for q, a, r in english_questions(sentences)]
        else:
            questions = [(q, await say(language, q)) for q in QUESTIONS_ZH[:sentences]]
        out += [clip(language, q, [a], None, rng) for q, a in questions]
    return out


async def listen(engines: Engines, config: SessionConfig, smart_turn: bool, c: Clip) -> Heard:
    """Push the clip in real time through a new session's listener; returns what it told."""
    vad = CountingVad(engines.vad)
    heard = Heard(lambda: vad.samples)
    listener = Listener(vad, engines.asr, heard, config.listener, language=config.language,
                        session_id="cutoffs", turn=engines.turn if smart_turn else None)
    audio: Channel[Float32Array] = Channel(100)
    async with asyncio.TaskGroup() as tg:
        listening = tg.create_task(listener.run(audio, tg))
        start = time.monotonic()
        for i in range(0, c.audio.size, CHUNK):
            delay = start + i / MODEL_RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await audio.put(c.audio[i:i + CHUNK])
            if i <= c.voice_end - 1 < i + CHUNK:
                heard.voice_end_at = time.monotonic()
        audio.close()
        await listening
    return heard


@dataclass(slots=True)
class Tally:
    cut: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (lang, pause) → 0/1
    endpoint_ms: dict[str, list[float]] = field(default_factory=dict)  # lang or 'all' → delays
    final_ms: dict[str, list[float]] = field(default_factory=dict)
    missed: int = 0  # complete questions that did not end in one utterance


def score(tally: Tally, c: Clip, heard: Heard) -> str:
    ms = 1000 / MODEL_RATE
    stops = ", ".join(f"{(s - c.paused) * ms:+.0f}" for s in heard.stopped)  # after the voice
    finals = " | ".join(repr(t) for _, t in heard.finals)
    if c.pause_ms is not None:
        cut = any(s < c.voice_end for s in heard.stopped)
        tally.cut.setdefault((c.language, c.pause_ms), []).append(int(cut))
        return f"{'CUT' if cut else 'ok':3s} {c.pause_ms} ms  ended {stops} ms after the first half  {finals}"
    if len(heard.stopped) != 1 or not heard.finals:
        tally.missed += 1
        return f"MISSED  stops {stops} ms  {finals}"
    final = (heard.finals[-1][0] - heard.voice_end_at) * 1000
    for lang in (c.language, "all"):
        tally.endpoint_ms.setdefault(lang, []).append((heard.stopped[0] - c.voice_end) * ms)
        tally.final_ms.setdefault(lang, []).append(final)
    return f"question  endpoint {stops} ms  final {final:+.0f} ms  {finals}"


def cpu_s() -> tuple[float, float]:
    """CPU seconds used so far by every process (Linux /proc/stat; 0 elsewhere) and by this one."""
    own = sum(os.times()[:2])
    try:
        with open("/proc/stat") as f:
            user, nice, system, _, _, irq, softirq = map(int, f.readline().split()[1:8])
    except (OSError, ValueError):
        return 0.0, own
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), own


def report(tallies: dict[str, Tally], languages: list[str], pauses: list[int],
           took_s: float, cpu: tuple[float, float]) -> None:
    machine = " ".join(filter(None, [platform.machine(), platform.processor()]))
    print(f"\nfalse cut-offs: the turn ended in a mid-sentence pause (sentences cut / said)\n"
          f"{machine}, {os.cpu_count()} cores; {took_s / 60:.0f} min in real time; CPU busy on "
          f"average: this bench {cpu[1] / took_s:.2f} cores, other processes {cpu[0] / took_s:.2f}")
    print(f"{'policy':20s}{'lang':6s}" + "".join(f"{f'{p} ms':>9s}" for p in pauses))
    for name, t in tallies.items():
        for lang in languages:
            cells = [t.cut.get((lang, p), []) for p in pauses]
            print(f"{POLICIES[name][0]:20s}{lang:6s}"
                  + "".join(f"{f'{sum(c)}/{len(c)}':>9s}" for c in cells))
    print("\nendpoint delay on complete questions: input audio from the end of the voice to the "
          "endpoint;\nfinal transcript: wall time from the end of the voice (pushed in real time)")
    print(f"{'policy':20s}{'lang':6s}{'endpoint p50 / p95 ms':>23s}{'final p50 / p95 ms':>21s}"
          f"{'missed':>8s}")
    for name, t in tallies.items():
        for lang in [*languages, "all"]:
            ends, finals = t.endpoint_ms.get(lang, []), t.final_ms.get(lang, [])
            if not ends:
                continue
            print(f"{POLICIES[name][0]:20s}{lang:6s}"
                  f"{f'{pct(ends, .5):.0f} / {pct(ends, .95):.0f}':>23s}"
                  f"{f'{pct(finals, .5):.0f} / {pct(finals, .95):.0f}':>21s}"
                  + (f"{t.missed:>8d}" if lang == "all" else ""))


async def run(policies: list[str], languages: list[str], sentences: int, pauses: list[int]) -> None:
    compute = Compute()
    try:
        # the server's engines (LLM and vision not needed: not loaded), smart-turn included
        settings = load_settings(llm={"engine": "openai"}, vision={"engine": "none"},
                                 endpoint={"turn_model": "smart-turn"})
        engines = await asyncio.to_thread(build_engines, settings, compute)
        todo = await clips(engines, languages, sentences, pauses)
        configs = {}
        for name in policies:
            s = load_settings(endpoint=POLICIES[name][1])
            configs[name] = (session_config(s), s.endpoint.turn_model == "smart-turn")
        print(f"{len(todo)} clips ({sum(c.audio.size for c in todo) / MODEL_RATE:.0f} s of audio) "
              f"per policy; ASR {engines.asr.name}", file=sys.stderr)
        for lang in languages:  # warm every path once (not counted)
            warm = next(c for c in todo if c.language == lang)
            for config, smart in configs.values():
                await listen(engines, config, smart, warm)
        tallies = {name: Tally() for name in policies}
        start, (all_before, own_before) = time.monotonic(), cpu_s()
        for i, c in enumerate(todo):
            order = policies[i % len(policies):] + policies[:i % len(policies)]  # none always first
            for name in order:
                heard = await listen(engines, *configs[name], c)
                print(f"  {name:10s} {c.language} {score(tallies[name], c, heard)}   ({c.text})",
                      file=sys.stderr)
        all_after, own_after = cpu_s()
        own = own_after - own_before
        report(tallies, languages, pauses, time.monotonic() - start,
               (max(0.0, all_after - all_before - own), own))
    finally:
        compute.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=10, help="per language (at most 10)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--languages", default="en,zh")
    parser.add_argument("--pauses", default="300,500,700", help="ms of silence mid-sentence")
    args = parser.parse_args()
    policies = [p for p in args.policies.split(",") if p]
    unknown = set(policies) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}: choose from {list(POLICIES)}")
    import logging

    logging.basicConfig(level="WARNING")
    asyncio.run(run(policies, [lang for lang in args.languages.split(",") if lang],
                    min(args.sentences, len(SPLIT_EN)), [int(p) for p in args.pauses.split(",")]))


if __name__ == "__main__":
    main()
