"""The web page reconnects by itself when its node drains (issue 16, point 4), in a real headless
Chromium: HAProxy (deploy/haproxy.cfg) in front of two ``voxlens serve`` nodes on 127.0.0.1, the
page opened through the balancer, in its own transport (WebRTC: /offer goes to any node, and the
media flows to the node that answered it, on loopback; no STUN server is configured, so no
candidate leaves the machine).

A typed turn is answered; the node holding the session is drained with SIGTERM; the page gets
``session.closing``, opens a new session through the balancer by itself, lands on the other
node, and answers the next typed turn there; the drained node exits 0. The nodes run the small
packaged models (tests/e2e/test_reconnect.py's LIGHT): the test is about the connection."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.async_api import Page, async_playwright

from client.common.wavio import write_wav
from server.launch import Fleet, spawn_fleet
from tests.conftest import ARTIFACTS
from tests.e2e.test_browser import CHROMIUM, FLAGS, wait
from tests.e2e.test_reconnect import GUARD_S, LIGHT, health, sessions, the_node_with_the_session

# What the conversation log shows: (who, text) for each line, in order.
LOG = """() => [...document.querySelectorAll("#log li")].map(
  (li) => [li.classList.contains("user") ? "user" : "assistant",
           li.firstChild ? li.firstChild.textContent.trim() : ""])"""
ANSWERS = "document.querySelectorAll('#log li.assistant')"


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    f = spawn_fleet(2, ARTIFACTS / "reconnect-browser", env=LIGHT)
    try:
        yield f
    finally:
        f.stop()


async def ask(page: Page, text: str, answers: int) -> None:
    """Type ``text``, send it, and wait until the log shows answer number ``answers`` with its
    text and its latency (the turn's metrics came: the reply is complete)."""
    await page.fill("#text", text)
    await page.click("#send")
    await wait(page, f"{ANSWERS}.length >= {answers} && "
                     f"{ANSWERS}[{answers - 1}].querySelector('.ms') !== null && "
                     f"{ANSWERS}[{answers - 1}].firstChild.textContent.trim() !== ''", GUARD_S)


async def test_page_goes_to_the_other_node_when_its_node_drains(fleet: Fleet,
                                                                tmp_path: Path) -> None:
    silence = tmp_path / "silence.wav"  # a quiet microphone: the conversation is typed
    write_wav(silence, np.zeros(16_000, np.float32), 16_000)
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=[*FLAGS, f"--use-file-for-fake-audio-capture={silence}"])
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 800})
            await page.goto(f"{fleet.http}/?autostart=1")
            await wait(page, "window.voxlens.sessionId !== null", 60)
            first_session = await page.evaluate("window.voxlens.sessionId")
            await ask(page, "What is two plus two?", 1)
            before = await page.evaluate(LOG)
            drained, other = await the_node_with_the_session(fleet)
            drained.proc.send_signal(signal.SIGTERM)
            # the drain's time is up: the node says session.closing, and the page opens a new
            # session through the balancer by itself
            await wait(page, "window.voxlens.reconnects === 1", GUARD_S)
            closing = await page.evaluate("window.voxlens.errors.slice()")
            await wait(page, f"window.voxlens.sessionId !== {first_session!r} && "
                             "window.voxlens.state === 'listening'", GUARD_S)
            await wait(page, "!document.querySelector('#send').disabled", GUARD_S)
            on_other = sessions(other)
            drained_health = health(drained)[0]
            drained_exit = await asyncio.to_thread(drained.proc.wait, GUARD_S)
            await ask(page, "What is the capital of France?", 2)
            after = await page.evaluate(LOG)
            vx = await page.evaluate("window.voxlens")
            shown = {"connect": await page.text_content("#connect"),
                     "error": await page.is_visible("#error")}
            await page.screenshot(path=str(ARTIFACTS / "page-reconnected.png"))
        finally:
            await browser.close()
    assert closing == ["The assistant is restarting; reconnecting you…"], closing
    assert on_other == 1 and drained_health != 200  # the new session is on the other node
    assert drained_exit == 0
    assert vx["reconnects"] == 1 and vx["sessionId"] != first_session
    assert vx["errors"] == closing, vx["errors"]  # nothing went wrong after the reconnect
    assert shown == {"connect": "Disconnect", "error": False}, shown  # connected, no error left
    # the first turn stays as it was; the second is asked and answered below it
    assert after[:len(before)] == before, (before, after)
    assert [who for who, _ in after] == ["user", "assistant", "user", "assistant"], after
    assert after[0][1] == "What is two plus two?" and after[2][1] == "What is the capital of France?"
    assert after[1][1] and after[3][1], after
