"""The server's echo canceller on a microphone that carries no echo (headphones, a client that
plays nothing): after a reply played over steady room noise it lets the audio pass as it came,
so a voice over a later reply is not bent; a microphone with echo keeps the canceller, and echo
that appears later brings it back (streaming/echo.py, "No echo at all"). A piper reply, the
room of client/common/acoustics.py, a virtual clock: each run is the same."""

from __future__ import annotations

import numpy as np
import pytest

from client.common.acoustics import heard_in_room
from streaming.audio import MODEL_RATE, Float32Array, float_to_pcm16, resample
from streaming.echo import FRAME, EchoCanceller
from tests.conftest import speak

pytestmark = pytest.mark.models  # piper speaks the reply and the person

STEP = MODEL_RATE // 50  # 20 ms microphone messages
LEAD = MODEL_RATE // 5  # reply audio sent 200 ms ahead of its playing


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def reply(voice) -> Float32Array:  # type: ignore[no-untyped-def]
    audio, rate = speak(voice, "The capital of France is Paris. It is known for the Eiffel "
                               "Tower, its museums and the cafes along the river Seine.")
    return resample(audio, rate, MODEL_RATE)


@pytest.fixture(scope="module")
def person(voice) -> Float32Array:  # type: ignore[no-untyped-def]
    audio, rate = speak(voice, "What your country can do for you.")
    return resample(audio, rate, MODEL_RATE)


def room_noise(n: int, seed: int = 1) -> Float32Array:
    return np.random.default_rng(seed).normal(0, 10 ** (-60 / 20), n).astype(np.float32)


def play(aec: EchoCanceller, clock: Clock, reply: Float32Array, mic: Float32Array) -> Float32Array:
    """One reply played while the microphone streams ``mic`` (as long as the reply, or longer),
    the reply going out 200 ms ahead as over WebSocket; the canceller's output, lined up with
    ``mic`` (the canceller holds one 10 ms frame back)."""
    pcm = float_to_pcm16(reply)
    aec.played(pcm[:2 * LEAD])
    out = []
    for k in range(mic.size // STEP):
        ahead = pcm[2 * (LEAD + STEP * k):2 * (LEAD + STEP * (k + 1))]
        if ahead:
            aec.played(ahead)
        out.append(aec.capture(mic[STEP * k:STEP * (k + 1)]))
        clock.t += STEP / MODEL_RATE
    return np.concatenate(out)[FRAME:]


def error_db(out: Float32Array, mic: Float32Array, at: int, n: int) -> float:
    """How far the output is from the microphone's audio over ``n`` samples from ``at``, in dB
    under that audio."""
    a, b = mic[at:at + n], out[at:at + n]
    return float(10 * np.log10(np.mean((b - a) ** 2) + 1e-20) - 10 * np.log10(np.mean(a ** 2)))


def erle_db(out: Float32Array, mic: Float32Array, at: int) -> float:
    a, b = mic[at:at + out.size - at], out[at:]
    return float(10 * np.log10(np.mean(a ** 2)) - 10 * np.log10(np.mean(b ** 2) + 1e-20))


def test_a_microphone_without_echo_passes_as_it_came_from_the_second_reply(
        reply: Float32Array, person: Float32Array) -> None:
    clock = Clock()
    aec = EchoCanceller(MODEL_RATE, clock=clock)
    over = reply.size // 4  # the person speaks a quarter into the reply
    said = room_noise(reply.size)
    said[over:over + person.size] += person[:reply.size - over]
    first = play(aec, clock, reply, said)  # nothing known yet: cancelled, and bent
    assert error_db(first, said, over, person.size) > -10
    assert aec.echo_absent and aec.echo_lag is None  # the rest of the reply: no echo came
    again = play(aec, clock, reply, said)
    assert aec.echo_absent
    np.testing.assert_array_equal(again, said[:again.size])  # the voice as it was said


def test_a_microphone_with_echo_keeps_the_canceller(reply: Float32Array) -> None:
    clock = Clock()
    aec = EchoCanceller(MODEL_RATE, clock=clock)
    for _ in range(2):
        heard = heard_in_room(reply, 80, -6)
        out = play(aec, clock, reply, heard)
        assert not aec.echo_absent and aec.echo_lag is not None
        assert erle_db(out, heard, reply.size // 2) > 15


def test_echo_that_appears_later_brings_the_canceller_back(reply: Float32Array) -> None:
    clock = Clock()
    aec = EchoCanceller(MODEL_RATE, clock=clock)
    play(aec, clock, reply, room_noise(reply.size))
    play(aec, clock, reply, room_noise(reply.size, seed=2))
    assert aec.echo_absent
    heard = heard_in_room(reply, 80, -6)  # the headphones come off
    out = play(aec, clock, reply, heard)
    assert not aec.echo_absent and aec.echo_lag is not None
    assert erle_db(out, heard, reply.size // 2) > 15
