"""The web page in a real headless Chromium, with a fake microphone fed from a WAV and a fake
camera, against a real server. Browser and server share a network namespace of their own that
has nothing but loopback, so every WebRTC candidate and packet stays on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.async_api import async_playwright

from client.wavio import write_wav
from server.launch import ServerProcess, spawn_server
from tests.conftest import ARTIFACTS, speak

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-features=WebRtcHideLocalIpsWithMdns,MediaRouter,OptimizationHints",
    "--allow-loopback-in-peer-connection",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("the browser test makes a network namespace: run it as root (CI does)")
    name = f"vxl{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def ns_server(netns: str) -> Iterator[ServerProcess]:
    # aioice leaves loopback out of its host candidates; loopback is all this namespace has
    server = spawn_server(ARTIFACTS / "server-browser.log", netns=netns,
                          env={"VOXLENS_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]'})
    yield server
    server.stop()


async def test_page_holds_a_spoken_conversation(ns_server: ServerProcess, netns: str, voice,  # type: ignore[no-untyped-def]
                                                tmp_path: Path) -> None:
    audio, rate = speak(voice, "What is the capital of France?")
    question = tmp_path / "question.wav"  # Chromium loops the file: speech, then 6 s of silence
    write_wav(question, np.concatenate([np.zeros(rate // 2, np.float32), audio,
                                        np.zeros(rate * 6, np.float32)]), rate)
    launcher = tmp_path / "chromium-in-netns"
    launcher.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {CHROMIUM} "$@"\n')
    launcher.chmod(0o755)
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=str(launcher), headless=True,
            args=[*FLAGS, f"--use-file-for-fake-audio-capture={question}"])
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 800})
            await page.goto(f"http://127.0.0.1:{ns_server.port}/?autostart=1&camera=1")
            await page.wait_for_function("window.voxlens.sessionId !== null", timeout=30_000)
            await page.wait_for_function(
                "window.voxlens.finals.length > 0 && window.voxlens.metrics.length > 0",
                timeout=120_000)
            await page.wait_for_function("window.voxlens.audioEnergy > 0", timeout=30_000)
            # the fake camera's frames reached the vision engine; the page shows what it saw
            await page.wait_for_function("window.voxlens.scene !== null", timeout=30_000)
            # the page reports its playout position (barge-in knows what was heard) ...
            await page.wait_for_function("window.voxlens.playbackReports > 0", timeout=30_000)
            # ... and Stop cuts a reply: the server answers with reply.interrupted
            replies = await page.evaluate("Object.keys(window.voxlens.replies).length")
            await page.fill("#text", "Tell me a long story about the history of Paris.")
            await page.click("#send")
            await page.wait_for_function(
                f"Object.keys(window.voxlens.replies).length > {replies}", timeout=60_000)
            await page.click("#stop")
            await page.wait_for_function("window.voxlens.interrupted.length > 0", timeout=30_000)
            vx = await page.evaluate("window.voxlens")
            await page.screenshot(path=str(ARTIFACTS / "page.png"))
            phone = await browser.new_page(viewport={"width": 390, "height": 844})
            await phone.goto(f"http://127.0.0.1:{ns_server.port}/")
            await phone.screenshot(path=str(ARTIFACTS / "page-phone.png"))
        finally:
            await browser.close()
    assert "capital of france" in vx["finals"][0].lower()
    assert any("paris" in text.lower() for text in vx["replies"].values())
    assert vx["audioEnergy"] > 0 and vx["receivedMs"] > 0
    assert not vx["errors"], vx["errors"]
    assert vx["scene"].strip()
    assert vx["interrupted"][0]["turn_id"] > 0
