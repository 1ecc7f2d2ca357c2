"""A media node whose ASR, TTS and LLM are another voxlens node's, over the OpenAI API
(issue 16, point 1): ``asr.engine = "openai"``, ``tts.engine = "openai"`` and
``llm.engine = "openai"`` pointed at a model node's ``/v1`` (``/v1/audio/transcriptions``,
``/v1/audio/speech``, ``/v1/chat/completions``). Both nodes are real ``voxlens serve``
processes on 127.0.0.1; the media node loads no model but Silero VAD. A spoken
conversation works end to end; when the model node dies, the turn gets a clear error and
the session goes on; when it is back (same port), the next turn works."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest

from client.common.ws_client import VoxlensClient
from server.launch import ServerProcess, free_port, spawn_server
from tests.conftest import ARTIFACTS, speak

MODEL_NODE_ENV = {"VOXLENS_LLM__TEMPERATURE": "0",  # greedy: reproducible answers
                  "VOXLENS_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]'}


class ModelNode:
    """A voxlens node serving its embedded engines, restartable on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: ServerProcess | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.proc = spawn_server(ARTIFACTS / "server-model-node.log", env=MODEL_NODE_ENV,
                                 port=self.port)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.proc.kill()
            self.proc.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def model_node() -> Iterator[ModelNode]:
    node = ModelNode()
    node.start()
    yield node
    node.kill()


@pytest.fixture(scope="module")
def media_node(model_node: ModelNode) -> Iterator[ServerProcess]:
    url = model_node.base_url
    s = spawn_server(ARTIFACTS / "server-media-node.log", env={
        "VOXLENS_ASR__ENGINE": "openai", "VOXLENS_ASR__BASE_URL": url,
        "VOXLENS_TTS__ENGINE": "openai", "VOXLENS_TTS__BASE_URL": url,
        "VOXLENS_LLM__ENGINE": "openai", "VOXLENS_LLM__BASE_URL": url,
        "VOXLENS_LLM__MODEL": "voxlens", "VOXLENS_VISION__ENGINE": "none",
        "VOXLENS_ASR__TIMEOUT_S": "5", "VOXLENS_TTS__TIMEOUT_S": "5",
        "VOXLENS_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]'})
    yield s
    s.stop()


def model_work_done(node: ModelNode, lane: str) -> float:
    """Work the model node's scheduler ran on a lane (its Prometheus counter)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("voxlens_run_seconds_count") and f'lane="{lane}"' in line)


async def test_a_spoken_conversation_through_another_nodes_models(
        media_node: ServerProcess, model_node: ModelNode, voice) -> None:  # type: ignore[no-untyped-def]
    asr_before, tts_before = model_work_done(model_node, "asr"), model_work_done(model_node, "tts")
    async with VoxlensClient(media_node.ws) as client:
        assert client.ready is not None
        models = client.ready["models"]
        assert models["asr"].startswith("openai-asr:") and models["llm"] == "openai:voxlens"
        assert "openai-tts:joe" in models["tts"]
        audio, rate = speak(voice, "What is the capital of France?")
        await client.stream_audio(audio, rate)
        reply = await client.wait_reply(timeout_s=90)
        assert reply.transcript and "capital of france" in reply.transcript.lower()
        assert "paris" in reply.text.lower() and len(reply.audio) > 0
        audio, rate = speak(voice, "And what is the capital of Italy?")
        await client.stream_audio(audio, rate)
        reply = await client.wait_reply(timeout_s=90)
        assert "rome" in reply.text.lower() and len(reply.audio) > 0
    # the model node's own scheduler ran the media node's transcripts and speech
    assert model_work_done(model_node, "asr") > asr_before
    assert model_work_done(model_node, "tts") > tts_before


async def test_the_model_node_down_is_an_error_for_the_turn_and_the_session_goes_on(
        media_node: ServerProcess, model_node: ModelNode, voice) -> None:  # type: ignore[no-untyped-def]
    audio, rate = speak(voice, "What is the capital of Spain?")
    async with VoxlensClient(media_node.ws) as client:
        model_node.kill()
        await client.stream_audio(audio, rate)
        await client.wait_for(lambda: any(e["type"] == "error" for e in client.events), 60)
        error = next(e for e in client.events if e["type"] == "error")
        assert error["code"] == "engine_failed" and not error["fatal"]
        assert "ASR endpoint" in error["message"]
        model_node.start()  # back on the same port: the same session's next turn works
        await client.stream_audio(audio, rate)
        reply = await client.wait_reply(timeout_s=90)
        assert "madrid" in reply.text.lower() and len(reply.audio) > 0
