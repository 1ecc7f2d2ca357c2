"""The server's echo canceller (streaming/echo.py) on real speech: piper's voice through the
simulated room of client/common/acoustics.py, silero VAD to tell what is still speech. A virtual
clock stands for the wall time the canceller aligns the reply and the microphone with."""

from __future__ import annotations

import numpy as np
import pytest

from client.common.acoustics import EchoRoom, heard_in_room
from pipelines.bargein import BargeInConfig
from pipelines.engines.vad_silero import SileroVad
from pipelines.models import silero_vad_path
from streaming.audio import Float32Array, float_to_pcm16, resample
from streaming.echo import HISTORY_FRAMES, EchoCanceller
from tests.conftest import speak

FRAME = 320  # 20 ms at 16 kHz, as the transports deliver it
REPLY = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad(silero_vad_path())


def say(voice, text: str) -> Float32Array:  # type: ignore[no-untyped-def]
    audio, rate = speak(voice, text)
    return resample(audio, rate, 16_000)


def voiced_ms(vad: SileroVad, x: Float32Array) -> int:
    stream = vad.new_stream()
    return 32 * sum(stream(x[i:i + 512]) >= 0.5 for i in range(0, x.size - 511, 512))


def level_db(x: Float32Array) -> float:
    return float(10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-12))


def cancel(aec: EchoCanceller, clock: Clock, mic: Float32Array) -> Float32Array:
    out = []
    for i in range(0, mic.size, FRAME):
        out.append(aec.capture(mic[i:i + FRAME]))
        clock.t += FRAME / 16_000
    return np.concatenate(out)


@pytest.mark.parametrize("pause_s", [0.3, 5.0])
def test_words_after_the_reply_survive_when_the_microphone_sent_nothing_meanwhile(  # type: ignore[no-untyped-def]
        voice, vad: SileroVad, pause_s: float) -> None:
    """A client that sends audio only while the person talks (push-to-talk, or the first words
    after a typed turn): the reply it played meanwhile is not paired with the person's words."""
    clock = Clock()
    aec = EchoCanceller(16_000, clock=clock)
    reply = float_to_pcm16(say(voice, REPLY))
    for i in range(0, len(reply), 2 * 640):  # sent in real time, 40 ms per message
        aec.played(reply[i:i + 2 * 640])
        clock.t += 0.04
    clock.t += pause_s
    question = say(voice, "What do you see?")
    out = cancel(aec, clock, question)
    assert level_db(out) > level_db(question) - 3
    assert voiced_ms(vad, out) >= 0.8 * voiced_ms(vad, question)


def test_a_pause_after_audio_sent_faster_than_real_time_is_noticed(voice, vad: SileroVad) -> None:  # type: ignore[no-untyped-def]
    """10 s of microphone audio sent at once (a file, a client catching up) does not put the
    stream 10 s ahead of the wall clock: the pause after it is still a restart."""
    clock = Clock()
    aec = EchoCanceller(16_000, clock=clock)
    for _ in range(500):
        aec.capture(np.zeros(FRAME, dtype=np.float32))
    reply = float_to_pcm16(say(voice, REPLY))
    for i in range(0, len(reply), 2 * 640):
        aec.played(reply[i:i + 2 * 640])
        clock.t += 0.04
    clock.t += 0.3
    question = say(voice, "What do you see?")
    out = cancel(aec, clock, question)
    assert voiced_ms(vad, out) >= 0.8 * voiced_ms(vad, question)


def test_a_cut_reply_does_not_shift_the_next_ones_timing(voice, vad: SileroVad) -> None:  # type: ignore[no-untyped-def]
    """A cut drops the reply audio the client had not played; the next reply's audio plays
    from then on, so a question right after it is still not paired with it."""
    clock = Clock()
    aec = EchoCanceller(16_000, clock=clock)
    reply = float_to_pcm16(say(voice, REPLY))
    aec.played(reply[:2 * 16_000 * 2])  # 2 s sent ahead of playing ...
    clock.t += 0.2
    aec.forget_unplayed()  # ... and cut 200 ms later
    for i in range(0, len(reply), 2 * 640):  # the next reply, in real time
        aec.played(reply[i:i + 2 * 640])
        clock.t += 0.04
    clock.t += 0.3
    question = say(voice, "What do you see?")
    out = cancel(aec, clock, question)
    assert voiced_ms(vad, out) >= 0.8 * voiced_ms(vad, question)


def test_echo_is_removed_while_the_microphone_streams(voice, vad: SileroVad) -> None:  # type: ignore[no-untyped-def]
    """The usual case: the microphone streams all along, the reply is sent 200 ms ahead of
    playing and comes back through the room 80 ms later at -6 dB."""
    clock = Clock()
    aec = EchoCanceller(16_000, clock=clock)
    reply = say(voice, REPLY)
    pcm = float_to_pcm16(reply)
    room = EchoRoom(16_000, delay_ms=80, gain_db=-6, noise_db=-50)
    room.hear(pcm)
    lead = 2 * 16 * 200
    aec.played(pcm[:lead])
    mic, out = [], []
    for k in range(reply.size // FRAME):
        nxt = pcm[lead + 2 * FRAME * k:lead + 2 * FRAME * (k + 1)]
        if nxt:
            aec.played(nxt)
        frame = room.tick()
        mic.append(frame)
        out.append(aec.capture(frame))
        clock.t += FRAME / 16_000
    half = len(mic) // 2  # after the canceller has converged
    raw, cancelled = np.concatenate(mic[half:]), np.concatenate(out[half:])
    assert level_db(raw) - level_db(cancelled) > 10  # echo return loss enhancement, dB
    assert voiced_ms(vad, cancelled) < 0.2 * voiced_ms(vad, raw)


def through_room(reply: Float32Array, echo_after_ms: int, gain_db: float,
                 person: Float32Array | None = None, person_at: int = 0) -> Float32Array:
    """The reply's echo as the client plays it ``echo_after_ms`` after the server's schedule,
    and the person's words from sample ``person_at`` on."""
    mic = heard_in_room(reply, echo_after_ms, gain_db)
    if person is not None:
        end = min(mic.size, person_at + person.size)
        mic[person_at:end] += person[:end - person_at]
    return mic


def cancel_scheduled(reply: Float32Array, mic: Float32Array) -> tuple[EchoCanceller, Float32Array]:
    """The canceller as a session drives it: the microphone streaming in 20 ms messages, the
    reply sent 200 ms ahead of its schedule."""
    clock = Clock()
    aec = EchoCanceller(16_000, clock=clock)
    cancel(aec, clock, np.zeros(8000, dtype=np.float32))  # the microphone streams already
    pcm = float_to_pcm16(reply)
    lead = 2 * 16 * 200
    aec.played(pcm[:lead])
    out = []
    for k in range(mic.size // FRAME):
        nxt = pcm[lead + 2 * FRAME * k:lead + 2 * FRAME * (k + 1)]
        if nxt:
            aec.played(nxt)
        out.append(aec.capture(mic[k * FRAME:(k + 1) * FRAME]))
        clock.t += FRAME / 16_000
    return aec, np.concatenate(out)


@pytest.mark.parametrize("echo_after_ms", [0, 80, 250])
def test_echo_is_removed_whether_the_client_plays_on_time_or_late(  # type: ignore[no-untyped-def]
        voice, echo_after_ms: int) -> None:
    """A client may play the reply on schedule with no latency at all, or later after a
    jitter buffer: AEC3 only cancels echo that comes after its reference, so the reference
    leads the microphone by a frame."""
    reply = say(voice, REPLY)
    mic = through_room(reply, echo_after_ms, -6)
    _, out = cancel_scheduled(reply, mic)
    half = out.size // 2
    assert level_db(mic[half:out.size]) - level_db(out[half:]) > 15


@pytest.mark.parametrize("words", ["Stop.", "Wait, stop. What is the capital of Spain?"])
def test_a_person_s_voice_stands_out_from_any_echo(voice, words: str) -> None:  # type: ignore[no-untyped-def]
    """Echo AEC3 removes and echo it cannot (a client playing 150 ms before its schedule, or
    700 ms after it: out of AEC3's reach) is never louder than the reply's echo can be; a
    person's words over it are, for longer than barge-in asks."""
    threshold = BargeInConfig().voice_beyond_echo_ms
    reply = say(voice, REPLY)
    person = say(voice, words)
    at = reply.size // 2
    lead = 8000 // 160 + 1  # the half second of microphone before the reply, the frame held
    window = (at // 160 + lead, (at + person.size) // 160 + lead)  # the person's words (10 ms)
    for echo_after_ms, gain_db in ((80, -6), (-150, -12), (-150, 0), (700, -6)):
        mic = through_room(reply, echo_after_ms, gain_db)
        aec, _ = cancel_scheduled(reply, mic)
        echo_only = [aec.voice_beyond_echo_ms(s, s + 100)  # every second of the reply's echo
                     for s in range(max(100, aec.frames - HISTORY_FRAMES + 300), aec.frames - 100, 50)]
        mic = through_room(reply, echo_after_ms, gain_db, person, at)
        aec, _ = cancel_scheduled(reply, mic)
        over_echo = aec.voice_beyond_echo_ms(*window)
        assert echo_only and all(e is not None and e < threshold for e in echo_only), echo_only
        assert over_echo is not None and over_echo >= threshold, (echo_after_ms, gain_db)
