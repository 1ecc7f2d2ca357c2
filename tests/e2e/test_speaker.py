"""``voxlens speaker`` in file mode (WAV in, WAV out, real time) against the real server, over
MQTT (the command line, numbered audio) and over WebSocket (in process, to see what it sends),
and reconnecting by itself across a broker restart; in Mandarin (``--language zh``, a real
recording as the microphone) over both."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from faster_whisper import WhisperModel

from client.common.links import Connection, Incoming, Link, MqttLink, WsLink
from client.common.wavio import read_wav, write_wav
from client.speaker.app import Speaker, SpeakerOptions
from client.speaker.audio import FileAudio
from streaming.audio import float_to_pcm16
from tests.broker import Broker
from tests.conftest import ARTIFACTS, MQTT_PREFIX, Server, speak
from tests.mandarin import check_mandarin_turn


def question_wav(voice, path: Path, text: str, lead_silence_s: float = 0.5) -> Path:  # type: ignore[no-untyped-def]
    audio, rate = speak(voice, text)
    audio = np.concatenate([np.zeros(int(rate * lead_silence_s), dtype=np.float32), audio])
    write_wav(path, audio, rate)
    return path


def heard(transcriber, wav: Path) -> str:  # type: ignore[no-untyped-def]
    """What Whisper hears in a recording, letters only ("isma drid" → "ismadrid": a short
    gap in the reply audio is no reason to miss a word)."""
    audio, rate = read_wav(wav)
    text: str = transcriber(float_to_pcm16(audio), rate)
    return "".join(c for c in text.lower() if c.isalpha())


class Recording:
    """A link that keeps every message the client sends."""

    def __init__(self, link: Link) -> None:
        self.link, self.name, self.resend_start = link, link.name, link.resend_start
        self.sequence = getattr(link, "sequence", False)
        self.sent: list[dict[str, Any]] = []
        self.connects = 0

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Connection]:
        async with self.link.connect() as conn:
            self.connects += 1
            yield _Recorded(conn, self.sent)


class _Recorded:
    def __init__(self, conn: Connection, sent: list[dict[str, Any]]) -> None:
        self.conn, self.sent = conn, sent

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        await self.conn.send(message)

    async def send_audio(self, pcm: bytes) -> None:
        await self.conn.send_audio(pcm)

    def incoming(self) -> AsyncIterator[Incoming]:
        return self.conn.incoming()


def test_speaker_over_mqtt_from_the_command_line(  # type: ignore[no-untyped-def]
        mqtt_server: Server, broker: Broker, voice, transcriber, tmp_path: Path) -> None:
    wav = question_wav(voice, tmp_path / "question.wav", "What is the capital of France?")
    out = tmp_path / "speaker-mqtt.wav"
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "speaker", "--mqtt", broker.url("speaker-1"),
         "--device", "speaker-1", "--prefix", MQTT_PREFIX, "--sequence", "--language", "en",
         "--input-file", str(wav), "--output-file", str(out), "--json"],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    ready = events[0]
    assert ready["type"] == "session.ready" and ready["input"]["sequence"] is True
    final = next(e for e in events if e["type"] == "transcript" and e["final"])
    assert "capital of france" in final["text"].lower()
    done = next(e for e in events if e["type"] == "reply.done")
    assert "paris" in done["text"].lower()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "speaker-mqtt.wav").write_bytes(out.read_bytes())
    text = heard(transcriber, out)
    assert "paris" in text, text


async def test_speaker_over_websocket_reports_what_it_played(  # type: ignore[no-untyped-def]
        mqtt_server: Server, voice, transcriber, tmp_path: Path) -> None:
    wav = question_wav(voice, tmp_path / "question.wav", "What is the capital of Italy?")
    out = tmp_path / "speaker-ws.wav"
    link = Recording(WsLink(mqtt_server.ws))
    speaker = Speaker(link, FileAudio(wav, out, 16000, 16000),
                      SpeakerOptions(output_rate=16000, language="en", json_events=True))
    assert await speaker.run() == 0
    start = link.sent[0]
    assert start["type"] == "session.start" and start["audio"]["echo_cancellation"] is False
    reports = [m for m in link.sent if m["type"] == "playback"]
    turns = {m["turn_id"] for m in reports}
    assert len(turns) == 1 and len(reports) >= 3, reports
    played = [m["played_ms"] for m in reports]
    assert played == sorted(played)
    assert played[-1] == round(speaker.playback.played_ms(turns.pop())) > 1000
    text = heard(transcriber, out)
    assert "rome" in text, text


async def test_speaker_reconnects_by_itself_and_resumes(  # type: ignore[no-untyped-def]
        mqtt_server: Server, broker: Broker, voice, transcriber, tmp_path: Path) -> None:
    # the question starts 3 s in: the broker restarts before it, and the file waits while the
    # client is not connected, so none of the question is lost
    wav = question_wav(voice, tmp_path / "question.wav", "What is the capital of Spain?",
                       lead_silence_s=3.0)
    out = tmp_path / "speaker-reconnect.wav"
    link = Recording(MqttLink(broker.url("speaker-2"), "speaker-2", prefix=MQTT_PREFIX))
    speaker = Speaker(link, FileAudio(wav, out, 16000, 24000),
                      SpeakerOptions(language="en", json_events=True))
    async with asyncio.timeout(240), asyncio.TaskGroup() as tg:
        run = tg.create_task(speaker.run())
        await speaker.ready.wait()
        first = speaker.session_id
        await asyncio.to_thread(broker.restart)
    assert run.result() == 0
    assert link.connects >= 2
    assert speaker.session_id == first  # the server kept the session for the device
    text = heard(transcriber, out)
    assert "madrid" in text, text


# ---- Mandarin ----------------------------------------------------------------------------


def test_speaker_in_mandarin_over_mqtt_from_the_command_line(
        mqtt_server: Server, broker: Broker, whisper: WhisperModel,
        zh_speech: list[tuple[Path, str]], tmp_path: Path) -> None:
    wav, said = zh_speech[0]  # a real recording: "甚至出现交易几乎停滞的情况"
    out = tmp_path / "speaker-mqtt-zh.wav"
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "speaker", "--mqtt", broker.url("dev-11"),
         "--device", "dev-11", "--prefix", MQTT_PREFIX, "--language", "zh",
         "--input-file", str(wav), "--output-file", str(out), "--json"],
        capture_output=True, encoding="utf-8", timeout=180)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert not [e for e in events if e["type"] == "error"], events
    final = [e for e in events if e["type"] == "transcript" and e["final"]]
    assert len(final) == 1 and final[0]["language"] == "zh", final
    reply = next(e for e in events if e["type"] == "reply.done")["text"]
    # the JSON lines carry the characters themselves, not \u escapes
    assert final[0]["text"] in result.stdout and reply in result.stdout
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "speaker-mqtt-zh.wav").write_bytes(out.read_bytes())
    check_mandarin_turn(whisper, said, final[0]["text"], reply, out)


async def test_speaker_in_mandarin_over_websocket(
        mqtt_server: Server, whisper: WhisperModel, zh_speech: list[tuple[Path, str]],
        tmp_path: Path) -> None:
    wav, said = zh_speech[1]  # "一二线城市虽然也处于调整中"
    out = tmp_path / "speaker-ws-zh.wav"
    link = Recording(WsLink(mqtt_server.ws))
    shown = io.StringIO()  # what a person reads: "you: …", "assistant: …"
    speaker = Speaker(link, FileAudio(wav, out, 16000, 24000), SpeakerOptions(language="zh"),
                      out=shown)
    assert await speaker.run() == 0
    assert link.sent[0]["type"] == "session.start" and link.sent[0]["language"] == "zh"
    lines = shown.getvalue().splitlines()
    you = [line.removeprefix("you: ") for line in lines if line.startswith("you: ")]
    replies = [line.removeprefix("assistant: ") for line in lines
               if line.startswith("assistant: ")]
    assert len(you) == 1 and len(replies) == 1, lines
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "speaker-ws-zh.wav").write_bytes(out.read_bytes())
    check_mandarin_turn(whisper, said, you[0], replies[0], out)
