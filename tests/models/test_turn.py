"""The end-of-turn model (smart-turn v3.2) on real speech: finished turns and cut ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.common.wavio import read_wav
from pipelines import models
from pipelines.compute import Compute
from pipelines.engines.turn_smart import SmartTurn
from streaming.audio import MODEL_RATE, Float32Array, resample
from tests.conftest import speak


@pytest.fixture(scope="module")
def turn(compute: Compute) -> SmartTurn:
    return SmartTurn(models.smart_turn(models.default_cache_dir()), compute)


def recorded(path: Path) -> Float32Array:
    audio, rate = read_wav(path)
    return resample(audio, rate, MODEL_RATE)


def spoken(voice, text: str) -> Float32Array:  # type: ignore[no-untyped-def]
    """Piper's words as a pause would hand them over: up to 100 ms after the last loud sample."""
    audio, rate = speak(voice, text)
    audio = resample(audio, rate, MODEL_RATE)
    last = int(np.nonzero(np.abs(audio) > 0.01)[0][-1])
    return audio[:last + MODEL_RATE // 10]


async def test_recorded_sentences_are_finished_and_their_first_halves_are_not(
        turn: SmartTurn, testdata: Path) -> None:
    jfk = recorded(testdata / "jfk.wav")
    assert await turn.complete(jfk) >= 0.5
    zh = sorted((testdata / "zh").glob("*.wav"))  # AISHELL-1 Mandarin sentences
    assert zh
    for path in zh:
        audio = recorded(path)
        assert await turn.complete(audio) >= 0.5, path.name
        assert await turn.complete(audio[:audio.size // 2]) < 0.5, path.name


async def test_a_question_is_finished_and_a_trailing_phrase_is_not(turn: SmartTurn, voice) -> None:  # type: ignore[no-untyped-def]
    assert await turn.complete(spoken(voice, "What is the capital of France?")) >= 0.5
    for trailing in ["I want to go to the", "Can you tell me, um,"]:
        assert await turn.complete(spoken(voice, trailing)) < 0.5, trailing


def test_the_input_window_is_the_last_eight_seconds(turn: SmartTurn, voice) -> None:  # type: ignore[no-untyped-def]
    """More than 8 s of audio: only its end counts (the model's contract)."""
    question = spoken(voice, "What is the capital of France?")
    long = np.concatenate([np.zeros(10 * MODEL_RATE, dtype=np.float32), question])
    assert turn.probability(long) == pytest.approx(turn.probability(question[-8 * MODEL_RATE:]),
                                                   abs=1e-4)
