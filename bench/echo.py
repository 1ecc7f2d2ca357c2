"""The server-side echo canceller offline: echo removed, speech kept, cost.

    .venv/bin/python -m bench.echo

A piper reply is played through the simulated room of client/common/acoustics.py (a few
reflections, room noise -50 dBFS) at several delays and levels and fed, with the reply
as the reference, through streaming.echo.EchoCanceller exactly as a session would
(10 ms steps; here the reference arrives 200 ms ahead, as over WebSocket). Prints the
echo return loss enhancement (ERLE, over the second half, after convergence), what
silero VAD still hears as voice in the cancelled echo, how much of a person's speech
over the echo survives (voiced ms with and without the echo), and the real-time factor
(the CPU share of one session's echo handling while a reply plays). Then the alignment:
a client playing the reply before or after the server's schedule, with the ERLE in the
first second and after, the voice VAD still hears, and the voice beyond the echo barge-in
asks for (streaming/echo.py): the most of it in any second of the echo alone, and in a
person's words over the echo.
Then a client that sends microphone audio only while the person talks: the reply plays
with no microphone audio coming, and the person's question follows after a pause (on a
virtual clock); prints what of the question survives the canceller. Last, a microphone with
no echo at all (headphones): a person's words over the first reply (nothing known yet: AEC3
runs) and over a later one (the canceller judged the echo absent and passes the audio): how
far the output is from the words said, and what Moonshine (English finals) hears in it.
"""

from __future__ import annotations

import time

import numpy as np

from client.common.acoustics import heard_in_room
from pipelines.bargein import BargeInConfig
from pipelines.engines.vad_silero import SileroVad
from pipelines.models import silero_vad_path
from streaming.audio import Float32Array, float_to_pcm16, resample
from streaming.echo import EchoCanceller

REPLY = ("The capital of France is Paris. It is known for the Eiffel Tower, its museums, and "
         "the cafes along the river Seine, and millions of people visit it every year.")
PERSON = "Stop, stop. What is the capital of Spain instead?"


def piper(text: str) -> Float32Array:
    from piper import PiperVoice

    from pipelines.models import piper_voice
    model, config = piper_voice("joe")
    v = PiperVoice.load(model, config_path=config)
    chunks = list(v.synthesize(text))
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    return resample(audio, chunks[0].sample_rate, 16_000)


def voiced_ms(vad: SileroVad, x: Float32Array) -> int:
    s = vad.new_stream()
    return 32 * sum(s(x[i:i + 512]) >= 0.5 for i in range(0, x.size - 511, 512))


def run(reply: Float32Array, mic: Float32Array) -> tuple[EchoCanceller, Float32Array, float]:
    """The canceller as a session drives it: the microphone streaming in 20 ms messages, the
    reply sent 200 ms ahead of its schedule. (canceller, cancelled, seconds spent)."""
    aec = EchoCanceller(16_000)
    for _ in range(25):  # the microphone streams already: 0.5 s of silence
        aec.capture(np.zeros(320, dtype=np.float32))
    lead = 16 * 200
    pcm = float_to_pcm16(reply)
    aec.played(pcm[:2 * lead])
    out, spent = [], 0.0
    for k in range(mic.size // 320):
        nxt = pcm[2 * (lead + 320 * k):2 * (lead + 320 * (k + 1))]
        t0 = time.perf_counter()
        if nxt:
            aec.played(nxt)
        out.append(aec.capture(mic[320 * k:320 * (k + 1)]))
        spent += time.perf_counter() - t0
    return aec, np.concatenate(out), spent


def with_person(mic: Float32Array, person: Float32Array, at: int) -> Float32Array:
    out = mic.copy()
    end = min(out.size, at + person.size)
    out[at:end] += person[:end - at]
    return out


def db(x: Float32Array) -> float:
    return float(10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-12))


def main() -> None:
    vad = SileroVad(silero_vad_path())
    reply = piper(REPLY)
    person = piper(PERSON)
    half = reply.size // 2
    print(f"reply {reply.size / 16000:.1f} s; person {person.size / 16000:.1f} s over its second half\n")
    print(f"{'delay ms':>8} {'echo dB':>7} {'ERLE dB':>7} {'voice in echo ms (raw → cancelled)':>36} "
          f"{'person voiced ms (clean / raw / cancelled)':>44} {'RTF':>6}")
    clean = voiced_ms(vad, person)
    for delay in (40, 80, 200):
        for gain in (-12, -6, 0):
            mic = heard_in_room(reply, delay, gain)
            _, out, spent = run(reply, mic)
            erle = db(mic[half:out.size]) - db(out[half:])
            raw_v, out_v = voiced_ms(vad, mic[half:out.size]), voiced_ms(vad, out[half:])
            mic2 = with_person(mic, person, half)
            _, out2, _ = run(reply, mic2)
            seg = slice(half, half + person.size)
            rtf = spent / (reply.size / 16000)
            print(f"{delay:8d} {gain:7d} {erle:7.1f} {raw_v:17d} → {out_v:<16d} "
                  f"{clean:15d} / {voiced_ms(vad, mic2[seg]):5d} / {voiced_ms(vad, out2[seg]):<14d}"
                  f" {rtf:6.3f}")
    alignment(vad, reply, person)
    restarts(vad, reply)
    no_echo(reply)


def alignment(vad: SileroVad, reply: Float32Array, person: Float32Array) -> None:
    """When the client plays the reply relative to the server's schedule: on arrival (up to
    the 200 ms lead early), on time with no latency, or late (jitter buffer, Bluetooth)."""
    threshold = BargeInConfig().voice_beyond_echo_ms
    half = reply.size // 2
    lead = 25 * 2 + 1  # 10 ms frames of microphone before the reply, and the frame held back
    frames = (half // 160 + lead, (half + person.size) // 160 + lead)  # the person's words
    print(f"\nclient playing the reply early (-) or late (+), -6 dB, reflections; voice beyond "
          f"the echo (a person at >= {threshold} ms): most in any 1 s of echo alone, and in the "
          f"person's {person.size / 16000:.1f} s over it:")
    print(f"{'played ms':>9} {'ERLE 1st s':>10} {'ERLE after':>10} {'voice left ms':>13} "
          f"{'beyond: echo only':>17} {'person over echo':>16}")
    for after in (-150, -90, -40, 0, 80, 250, 400, 500, 700):
        mic = heard_in_room(reply, after, -6)
        aec, out, _ = run(reply, mic)
        first = slice(0, 16000)
        echo_only = max((aec.voice_beyond_echo_ms(s, s + 100) or 0)
                        for s in range(max(lead, aec.frames - 500), aec.frames - 100, 50))
        aec2, _, _ = run(reply, with_person(mic, person, half))
        over = aec2.voice_beyond_echo_ms(*frames)
        print(f"{after:9d} {db(mic[first]) - db(out[first]):10.1f} "
              f"{db(mic[16000:out.size]) - db(out[16000:]):10.1f} "
              f"{voiced_ms(vad, out[16000:]):13d} {echo_only:17d} {nan(over):16.0f}",
              flush=True)


def nan(x: float | None) -> float:
    return float("nan") if x is None else x


def after_silent_stretch(reply: Float32Array, question: Float32Array, pause_s: float
                         ) -> Float32Array:
    """The reply is sent in real time while no microphone audio comes; after ``pause_s``
    the question streams in 20 ms frames."""
    t = [0.0]
    aec = EchoCanceller(16_000, clock=lambda: t[0])
    pcm = float_to_pcm16(reply)
    for i in range(0, len(pcm), 1280):
        aec.played(pcm[i:i + 1280])
        t[0] += 0.04
    t[0] += pause_s
    out = []
    for i in range(0, question.size, 320):
        out.append(aec.capture(question[i:i + 320]))
        t[0] += 0.02
    return np.concatenate(out)


def restarts(vad: SileroVad, reply: Float32Array) -> None:
    question = piper("What do you see?")
    print(f"\nmicrophone silent during the reply, then {question.size / 16000:.1f} s of question:")
    print(f"{'pause s':>8} {'question level dB (cancelled - clean)':>38} "
          f"{'voiced ms (clean / cancelled)':>30}")
    clean = voiced_ms(vad, question)
    for pause in (0.0, 0.3, 1.0, 5.0):
        out = after_silent_stretch(reply, question, pause)
        print(f"{pause:8.1f} {db(out) - db(question):38.1f} {clean:17d} / {voiced_ms(vad, out):<10d}")


def no_echo(reply: Float32Array) -> None:
    from pipelines.engines.asr_moonshine import MoonshineAsr
    from pipelines.models import default_cache_dir, moonshine_tiny

    asr = MoonshineAsr(moonshine_tiny(default_cache_dir()), None)  # type: ignore[arg-type]
    t = [0.0]
    aec = EchoCanceller(16_000, clock=lambda: t[0])
    noise = np.random.default_rng(1).normal(0, 10 ** (-60 / 20), reply.size).astype(np.float32)
    print("\nno echo at all (headphones): a person over the reply, room noise -60 dBFS")
    print(f"{'reply':>6} {'echo judged':>11} {'output - said dB':>16}  Moonshine hears")
    for words in ("What your country can do for you.", "Ask what you can do for your country.",
                  "Stop, what is the capital of Spain?"):
        person = piper(words)
        at = reply.size // 4
        said = noise.copy()
        said[at:at + person.size] += person[:reply.size - at]
        for k in range(2):  # the first reply of a session, then a later one
            if k == 0:
                aec = EchoCanceller(16_000, clock=lambda: t[0])
            judged = "absent" if aec.echo_absent else "unknown"
            out = _play(aec, t, reply, said)
            seg = slice(at, at + person.size)
            err = db(out[seg] - said[seg]) - db(said[seg])
            print(f"{k + 1:>6} {judged:>11} {err:16.1f}  {asr.run(out[seg]).text!r}", flush=True)
        print(f"{'said':>6} {'':>11} {'':>16}  {asr.run(said[at:at + person.size]).text!r}")


def _play(aec: EchoCanceller, t: list[float], reply: Float32Array, mic: Float32Array
          ) -> Float32Array:
    """One reply played (sent 200 ms ahead) while the microphone streams ``mic`` in 20 ms
    messages on the virtual clock ``t``; the output lined up with ``mic``."""
    lead = 16 * 200
    pcm = float_to_pcm16(reply)
    aec.played(pcm[:2 * lead])
    out = []
    for k in range(mic.size // 320):
        ahead = pcm[2 * (lead + 320 * k):2 * (lead + 320 * (k + 1))]
        if ahead:
            aec.played(ahead)
        out.append(aec.capture(mic[320 * k:320 * (k + 1)]))
        t[0] += 0.02
    return np.concatenate(out)[160:]


if __name__ == "__main__":
    main()
