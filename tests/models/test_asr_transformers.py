"""The PyTorch Whisper engine's real code path, on a tiny randomly initialised Whisper built from
a config here with the packaged Whisper base tokenizer (no hub): loading by path, one batch of
concurrent utterances, cancellation and superseding on the lane, decoding and language
detection equal to transformers' own ``generate``/``detect_language``, and the settings."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines import models
from pipelines.compute import Compute, Dropped, Priority
from pipelines.engines.asr_transformers import TransformersWhisperAsr
from pipelines.engines.base import AsrResult
from pipelines.metrics import ComputeMetrics
from server.settings import load_settings
from streaming.errors import ModelNotFound

pytestmark = pytest.mark.models

VOCAB = 51865  # multilingual Whisper (large-v3: 51866)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer Whisper with random weights, saved as a checkpoint directory, with the
    generation config a real checkpoint has (what transformers' ``generate`` needs)."""
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    out = tmp_path_factory.mktemp("tiny-whisper")
    base = Path(models.whisper_model("base", models.default_cache_dir()))
    tokenizer = WhisperTokenizer(tokenizer_file=str(base / "tokenizer.json"))
    extractor = WhisperFeatureExtractor(feature_size=80)  # type: ignore[no-untyped-call]
    WhisperProcessor(extractor, tokenizer).save_pretrained(out)  # type: ignore[no-untyped-call]
    config = WhisperConfig(vocab_size=VOCAB, num_mel_bins=80, d_model=16, encoder_layers=1,
                           decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=32, decoder_ffn_dim=32)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    vocab = tokenizer.get_vocab()
    g: Any = model.generation_config
    g.lang_to_id = {f"<|{c}|>": vocab[f"<|{c}|>"] for c in LANGUAGES if f"<|{c}|>" in vocab}
    g.task_to_id = {"transcribe": vocab["<|transcribe|>"], "translate": vocab["<|translate|>"]}
    g.no_timestamps_token_id = vocab["<|notimestamps|>"]
    g.decoder_start_token_id = vocab["<|startoftranscript|>"]
    g.eos_token_id = g.pad_token_id = vocab["<|endoftext|>"]
    g.is_multilingual = True
    g.suppress_tokens = list(range(vocab["<|startoftranscript|>"], VOCAB))
    g.begin_suppress_tokens = [220, vocab["<|endoftext|>"]]
    g._from_model_config = False  # as a real checkpoint's: loaded as it is
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def asr(tiny_whisper: Path) -> Iterator[TransformersWhisperAsr]:
    compute = Compute(metrics=ComputeMetrics())
    yield TransformersWhisperAsr(str(tiny_whisper), compute)
    compute.close()


def noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


async def hold_lane(compute: Compute) -> tuple[threading.Event, asyncio.Task[None]]:
    """Occupy the ``asr`` lane until the event is set (work queued meanwhile waits)."""
    release, started = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        release.wait(10)

    task = asyncio.create_task(compute.call("asr", Priority.VISION, block))
    assert await asyncio.to_thread(started.wait, 10)
    return release, task


async def queued(compute: Compute, n: int) -> None:
    """Wait until ``n`` requests are queued on the ``asr`` lane."""
    for _ in range(2000):
        if compute.lane("asr").queued() >= n:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{n} requests were never queued")


def metric(compute: Compute, name: str, work: str = "asr_final") -> float:
    value = compute.metrics.registry.get_sample_value(name, {"lane": "asr", "work": work})
    return value or 0.0


async def batches(compute: Compute) -> tuple[float, float]:
    """(batches, items) the ``asr`` lane ran at ASR_FINAL, once the last batch is recorded
    (the lane records it just after handing out the results)."""
    for _ in range(100):
        if metric(compute, "voxlens_batch_size_count"):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # a second batch, if any, would be recorded by now
    return metric(compute, "voxlens_batch_size_count"), metric(compute, "voxlens_batch_size_sum")


async def test_concurrent_utterances_are_one_batch(asr: TransformersWhisperAsr,
                                                   tiny_whisper: Path) -> None:
    compute = asr._compute
    release, blocker = await hold_lane(compute)
    utterances = [(noise(1.0, 1), None), (noise(2.5, 2), "en"), (noise(4.0, 3), "zh")]
    tasks = [asyncio.create_task(asr.transcribe(audio, language=language, session=f"s{i}",
                                                priority=Priority.ASR_FINAL))
             for i, (audio, language) in enumerate(utterances)]
    await queued(compute, 3)
    release.set()
    results = await asyncio.gather(*tasks)
    await blocker
    assert await batches(compute) == (1, 3)  # one batch of all three
    assert asr.name == f"transformers-whisper:{tiny_whisper}" and asr.multilingual
    for result in results:  # random weights: random words
        assert isinstance(result, AsrResult) and isinstance(result.text, str)
        assert 0.0 <= result.no_speech_prob <= 1.0 and result.avg_logprob <= 0.0
    assert results[0].language in asr.languages  # detected
    assert (results[1].language, results[2].language) == ("en", "zh")
    # each utterance decodes in the batch as it does alone
    alone = [await asr.transcribe(audio, language=language, priority=Priority.ASR_FINAL)
             for audio, language in utterances]
    assert [r.text for r in alone] == [r.text for r in results]


async def test_cancelled_and_superseded_requests_leave_the_rest(
        asr: TransformersWhisperAsr) -> None:
    compute = asr._compute
    cancelled_before = metric(compute, "voxlens_cancelled_total")
    stale_before = metric(compute, "voxlens_dropped_stale_total")
    release, blocker = await hold_lane(compute)

    def ask(seconds: float, seed: int, key: str | None = None) -> asyncio.Task[AsrResult]:
        return asyncio.create_task(asr.transcribe(noise(seconds, seed), language="en",
                                                  priority=Priority.ASR_FINAL, key=key))

    old, cancelled, kept = ask(1.0, 4, key="partial"), ask(1.5, 5), ask(2.0, 6)
    await queued(compute, 3)
    newer = ask(1.2, 7, key="partial")  # supersedes ``old`` while it is queued
    cancelled.cancel()
    with pytest.raises(Dropped):
        await old
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    release.set()
    for result in await asyncio.gather(kept, newer):
        assert isinstance(result, AsrResult) and result.language == "en"
    await blocker
    assert metric(compute, "voxlens_cancelled_total") == cancelled_before + 1
    assert metric(compute, "voxlens_dropped_stale_total") == stale_before + 1


def test_decoding_and_detection_equal_transformers_own(asr: TransformersWhisperAsr,
                                                      tiny_whisper: Path) -> None:
    """The engine's greedy loop (prompt, suppression, KV cache) gives the tokens
    ``generate`` gives, and its language detection ``detect_language``'s."""
    import torch
    from transformers import WhisperForConditionalGeneration

    model: Any = WhisperForConditionalGeneration.from_pretrained(tiny_whisper)
    audio = noise(2.0, 8)
    features = asr._processor.feature_extractor([audio], sampling_rate=16000,
                                                return_tensors="pt").input_features
    with torch.inference_mode():
        expected = model.generate(features, language="en", task="transcribe", max_new_tokens=24,
                                  do_sample=False, num_beams=1)[0].tolist()
        language = model.detect_language(features)[0].item()
    encoded = asr.encode([audio])
    ((tokens, _, _),) = asr.greedy(encoded, [asr._prompt("en")], max_new=[24])
    assert tokens and tokens == [t for t in expected if t != asr.eot]
    assert asr.languages[asr.detect(encoded)[0]] == language


def test_a_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="could not be loaded"):
        TransformersWhisperAsr(str(tmp_path / "nothing-here"), Compute())


def test_settings_build_the_engine(tiny_whisper: Path) -> None:
    from server.engines import build_asr

    settings = load_settings(asr={"engine": "transformers", "model": str(tiny_whisper)})
    compute = Compute()
    try:
        engine = build_asr(settings, compute, models.default_cache_dir())
    finally:
        compute.close()
    assert isinstance(engine, TransformersWhisperAsr)
    assert engine.name == f"transformers-whisper:{tiny_whisper}"
