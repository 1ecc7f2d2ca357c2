"""Shared fixtures: test data, the real packaged models, and a real server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streaming.audio import Float32Array, resample

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def testdata() -> Path:
    path = Path(os.environ.get("VOXLENS_TESTDATA")
                or Path.home() / ".cache" / "voxlens" / "testdata")
    if not (path / "jfk.wav").is_file():
        pytest.fail(f"test speech missing in {path}: run ./run.sh test (it fetches it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port = port
        self.proc = proc
        self.log = log
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}/ws"


def start_server(name: str, env: dict[str, str] | None = None) -> Server:
    """``voxlens serve`` in a subprocess on a free loopback port, ready when /healthz says so."""
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / f"server-{name}.log"
    full_env = {**os.environ, "VOXLENS_SERVER__PORT": str(port),
                "VOXLENS_SERVER__HOST": "127.0.0.1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT,
                            env=full_env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return Server(port, proc, log)
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not ready in time: {log.read_text()[-2000:]}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(20)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """The real server with the default embedded models."""
    s = start_server("default")
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def voice():  # type: ignore[no-untyped-def]
    """Piper with the packaged voice, to speak test questions."""
    from piper import PiperVoice

    from pipelines.models import piper_voice
    model, config = piper_voice("joe")
    return PiperVoice.load(model, config_path=config)


def speak(voice, text: str) -> tuple[Float32Array, int]:  # type: ignore[no-untyped-def]
    chunks = list(voice.synthesize(text))
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    return audio, chunks[0].sample_rate


@pytest.fixture(scope="session")
def transcriber():  # type: ignore[no-untyped-def]
    """Whisper base (packaged), to transcribe reply audio back to text."""
    from faster_whisper import WhisperModel

    from pipelines.models import default_cache_dir, whisper_model
    model = WhisperModel(whisper_model("base", default_cache_dir()), device="cpu",
                         compute_type="int8", cpu_threads=2)

    def transcribe(pcm: bytes, rate: int) -> str:
        audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
        segments, _ = model.transcribe(resample(audio, rate, 16000), language="en", beam_size=1)
        return " ".join(s.text.strip() for s in segments)
    return transcribe
