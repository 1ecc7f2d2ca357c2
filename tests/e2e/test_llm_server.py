"""A voxlens node whose LLM is a real OpenAI-compatible server: llama.cpp's own
(``python -m llama_cpp.server``, from llama-cpp-python[server]) serving the packaged GGUF on
127.0.0.1. A spoken question is answered through it; when the LLM server dies mid-reply that
turn gets a clear error, the sessions go on, and the next turn works once it is back."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.common.ws_client import VoxlensClient
from pipelines import models
from server.launch import ServerProcess, free_port, spawn_server
from tests.conftest import ARTIFACTS, speak

START_S = 120.0  # a hang guard for the LLM server's start, never a timing assertion


@dataclass
class LlmServer:
    """llama.cpp's OpenAI-compatible server on a fixed port (restartable on it)."""

    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        gguf = models.llm_model("qwen2.5-0.5b", models.default_cache_dir())
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "qwen",
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048", "--n_threads", "2"],
            stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"llama_cpp.server exited; see {self.log}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.2)
        raise TimeoutError(f"llama_cpp.server did not start; see {self.log}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def llm_server() -> Iterator[LlmServer]:
    server = LlmServer(free_port(), ARTIFACTS / "llama-cpp-server.log")
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def node(llm_server: LlmServer) -> Iterator[ServerProcess]:
    s = spawn_server(ARTIFACTS / "server-remote-llm.log", env={
        "VOXLENS_LLM__ENGINE": "openai", "VOXLENS_LLM__BASE_URL": llm_server.base_url,
        "VOXLENS_LLM__MODEL": "qwen", "VOXLENS_LLM__TEMPERATURE": "0",
        "VOXLENS_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]'})
    yield s
    s.stop()


async def test_a_spoken_question_is_answered_through_llama_cpps_server(
        node: ServerProcess, voice) -> None:  # type: ignore[no-untyped-def]
    audio, rate = speak(voice, "What is the capital of France?")
    async with VoxlensClient(node.ws) as client:
        assert client.ready is not None and client.ready["models"]["llm"] == "openai:qwen"
        await client.stream_audio(audio, rate)
        reply = await client.wait_reply(timeout_s=90)
    assert reply.transcript and "capital of france" in reply.transcript.lower()
    assert "paris" in reply.text.lower() and len(reply.audio) > 0


async def test_the_llm_server_dying_mid_reply_is_an_error_for_that_turn_alone(
        node: ServerProcess, llm_server: LlmServer) -> None:
    async with VoxlensClient(node.ws) as client, VoxlensClient(node.ws) as other:
        await client.say("Tell me a long story about a dragon who learns to bake bread.")
        await client.wait_for(lambda: any(e["type"] == "reply.text" for e in client.events), 90)
        llm_server.kill()
        await client.wait_for(lambda: any(e["type"] == "error" for e in client.events), 60)
        (error,) = [e for e in client.events if e["type"] == "error"]
        started = next(e for e in client.events if e["type"] == "reply.started")
        assert error["code"] == "engine_failed" and not error["fatal"]
        assert error["turn_id"] == started["turn_id"] and "LLM endpoint" in error["message"]
        assert not any(e["type"] == "reply.done" for e in client.events)  # that reply ended there
        await other.say("Hello!")  # another session, while the LLM is down: its turn fails alone
        await other.wait_for(lambda: any(e["type"] == "error" for e in other.events), 60)
        llm_server.start()  # back: both sessions go on
        await client.say("What is the capital of Italy?")
        reply = await client.wait_reply(timeout_s=90)
        assert "rome" in reply.text.lower()
        await other.say("What is the capital of France?")
        assert "paris" in (await other.wait_reply(timeout_s=90)).text.lower()
