"""`voxlens desktop` against a real server, with a spoken question as the microphone and a photo
of a cat as the camera: headless (events on stdout, reply audio recorded and heard back by
Whisper) and with its window on a virtual display (Xvfb), screenshot saved; and headless in
Mandarin (``--language zh``, a real recording as the microphone, no camera). WebRTC stays on
127.0.0.1 (host candidates pinned on both sides)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import wave
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from faster_whisper import WhisperModel
from PIL import ImageGrab
from skimage import data as photos

from client.common.wavio import read_wav, write_wav
from client.desktop.window import WINDOW_H, WINDOW_W
from pipelines.text import HAN, main_script, zh_script
from tests.conftest import ARTIFACTS, ROOT, Server, speak, until
from tests.mandarin import cer, hear


class DesktopProcess:
    """`voxlens desktop` as a child process; its stdout events are collected as they come."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, args: list[str], *, env: dict[str, str] | None = None,
                    log: Path) -> None:
        """Start ``voxlens desktop ARGS``; with ``--stdin`` in them, ``type`` sends lines."""
        log.parent.mkdir(parents=True, exist_ok=True)
        stdin = asyncio.subprocess.PIPE if "--stdin" in args else asyncio.subprocess.DEVNULL
        with log.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.cli", "desktop", *args, cwd=ROOT,
                env={**os.environ, **(env or {})}, stdin=stdin, stdout=asyncio.subprocess.PIPE,
                stderr=err)
        self._reader = asyncio.create_task(self._read())

    async def type(self, text: str) -> None:
        """A typed turn (``--stdin``)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def stop(self, sig: int) -> int:
        """Send ``sig`` and wait for a clean exit; returns the exit code."""
        assert self.proc is not None and self._reader is not None
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 60)
        await asyncio.wait_for(self._reader, 10)
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


@pytest.fixture
def question_and_cat(voice, tmp_path: Path) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    audio, rate = speak(voice, "What do you see?")
    wav = tmp_path / "question.wav"
    write_wav(wav, np.concatenate([np.zeros(rate // 2, np.float32), audio]), rate)
    cat = tmp_path / "chelsea.png"
    cv2.imwrite(str(cat), cv2.cvtColor(photos.chelsea(), cv2.COLOR_RGB2BGR))
    return wav, cat


def file_mode(server: Server, wav: Path, cat: Path, record: Path) -> list[str]:
    return ["--url", server.http, "--mic-file", str(wav), "--camera-file", str(cat),
            "--record", str(record), "--language", "en", "--ice-host", "127.0.0.1"]


def played_once(app: DesktopProcess) -> bool:
    return bool(app.of("desktop.played")) and bool(app.of("scene"))


async def test_headless_app_hears_sees_answers_and_records(server: Server, transcriber,  # type: ignore[no-untyped-def]
                                                           question_and_cat, tmp_path: Path) -> None:
    wav, cat = question_and_cat
    record = tmp_path / "reply.wav"
    app = DesktopProcess()
    try:
        await app.start(["--headless", *file_mode(server, wav, cat, record)],
                        log=ARTIFACTS / "desktop-headless.log")
        await until(lambda: played_once(app), timeout_s=180)
        code = await app.stop(signal.SIGINT)
    finally:
        await app.kill()
    assert code == 0
    assert not app.of("error"), app.of("error")
    # the camera file reached the server's vision engine
    assert any("cat" in e["text"] for e in app.of("scene")), app.of("scene")
    final = [e for e in app.of("transcript") if e["final"]]
    assert final and "what do you see" in final[0]["text"].lower()
    reply = app.of("reply.done")[0]["text"]
    assert "cat" in reply.lower(), reply
    # the reply audio was played (recorded) in full: Whisper hears it
    with wave.open(str(record)) as w:
        rate, pcm = w.getframerate(), w.readframes(w.getnframes())
    assert len(pcm) / 2 / rate > 1.0
    heard = transcriber(pcm, rate)
    assert "cat" in heard.lower(), heard
    played = app.of("desktop.played")[0]
    assert played["played_ms"] >= 1000 * len(pcm) / 2 / rate - 100
    summary = app.of("desktop.exit")[0]
    assert summary["you"].lower().startswith("what do you see") and summary["reply"] == reply
    assert app.of("desktop.closed")[0]["reason"] is None


async def test_window_under_xvfb_shows_the_conversation(server: Server, xdisplay: str,  # type: ignore[no-untyped-def]
                                                        question_and_cat, tmp_path: Path) -> None:
    wav, cat = question_and_cat
    app = DesktopProcess()
    shot = ARTIFACTS / "desktop.png"
    try:
        await app.start(file_mode(server, wav, cat, tmp_path / "reply.wav"),
                        env={"DISPLAY": xdisplay}, log=ARTIFACTS / "desktop-window.log")
        await until(lambda: played_once(app), timeout_s=180)
        await asyncio.sleep(0.5)  # the window draws what it was sent (it polls every 40 ms)
        image = ImageGrab.grab(bbox=(0, 0, WINDOW_W, WINDOW_H), xdisplay=xdisplay)
        image.save(shot)
        print(f"screenshot: {shot}")
        code = await app.stop(signal.SIGTERM)
    finally:
        await app.kill()
    assert code == 0
    shown = app.of("desktop.exit")[0]  # the texts that were on screen
    assert shown["you"].lower().startswith("what do you see")
    assert "cat" in shown["reply"].lower() and shown["reply"] in shown["log"]
    assert "cat" in shown["scene"] and shown["preview"] is True
    assert not shown["notice"]
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (WINDOW_H, WINDOW_W, 3) and pixels.std() > 20  # not a blank screen


async def test_headless_app_in_mandarin(server: Server, whisper: WhisperModel,
                                        zh_speech: list[tuple[Path, str]], tmp_path: Path) -> None:
    wav, said = zh_speech[0]  # a real recording: "甚至出现交易几乎停滞的情况"
    record = tmp_path / "reply-zh.wav"
    app = DesktopProcess()
    try:
        await app.start(["--headless", "--url", server.http, "--mic-file", str(wav), "--no-camera",
                         "--record", str(record), "--language", "zh", "--ice-host", "127.0.0.1"],
                        log=ARTIFACTS / "desktop-headless-zh.log")
        await until(lambda: bool(app.of("desktop.played")), timeout_s=180)
        code = await app.stop(signal.SIGINT)
    finally:
        await app.kill()
    assert code == 0
    assert not app.of("error"), app.of("error")
    final = [e for e in app.of("transcript") if e["final"]]
    assert len(final) == 1 and final[0]["language"] == "zh", final
    transcript = final[0]["text"]
    assert transcript == zh_script(transcript) and HAN.search(transcript), transcript
    assert cer(said, transcript) <= 0.2, transcript
    reply = app.of("reply.done")[0]["text"]
    assert main_script(reply) == "han", reply
    # the reply audio was played (recorded; only reply audio) in Mandarin: Whisper hears it
    (ARTIFACTS / "desktop-reply-zh.wav").write_bytes(record.read_bytes())
    audio, rate = read_wav(record)
    heard = hear(whisper, audio, rate, "zh")
    assert cer(reply, heard) <= 0.3, (reply, heard)
    # what the app shows, printed at exit, is the Chinese text as it came
    summary = app.of("desktop.exit")[0]
    assert summary["you"] == transcript and summary["reply"] == reply
    assert summary["log"] == [f"you: {transcript}", f"assistant: {reply}"], summary["log"]
