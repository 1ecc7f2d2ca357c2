"""The web page in a real headless Chromium, with a fake microphone fed from a WAV and a fake
camera, against a real server. Browser and server share a network namespace of their own that
has nothing but loopback, so every WebRTC candidate and packet stays on the machine (on
127.0.0.1, and for the HTTPS server on an address of the namespace's loopback device that is
not 127.0.0.0/8: a page there gets the microphone only over https).

Also: a server with an access key serving HTTPS itself (a self-signed certificate made here,
Chromium with --ignore-certificate-errors), whose page asks for the key, keeps it and connects
with a token minted for each connection."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.async_api import Browser, Page, Playwright, async_playwright
from playwright.async_api import TimeoutError as PlaywrightTimeout

from client.common.wavio import read_wav, write_wav
from server.launch import ServerProcess, free_port, spawn_server
from tests.conftest import ARTIFACTS, speak
from tests.tls import self_signed, wait_serving

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


async def launch(p: Playwright, netns: str, tmp_path: Path, microphone: Path,
                 extra: tuple[str, ...] = ()) -> Browser:
    """Chromium in the namespace, hearing ``microphone`` (a WAV it plays in a loop) as its
    microphone; ``extra``: more command-line flags."""
    launcher = tmp_path / "chromium-in-netns"
    launcher.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {CHROMIUM} "$@"\n')
    launcher.chmod(0o755)
    ARTIFACTS.mkdir(exist_ok=True)
    return await p.chromium.launch(
        executable_path=str(launcher), headless=True,
        args=[*FLAGS, f"--use-file-for-fake-audio-capture={microphone}", *extra])


async def test_page_holds_a_spoken_conversation(ns_server: ServerProcess, netns: str, voice,  # type: ignore[no-untyped-def]
                                                tmp_path: Path) -> None:
    audio, rate = speak(voice, "What is the capital of France?")
    question = tmp_path / "question.wav"  # Chromium loops the file: speech, then 6 s of silence
    write_wav(question, np.concatenate([np.zeros(rate // 2, np.float32), audio,
                                        np.zeros(rate * 6, np.float32)]), rate)
    async with async_playwright() as p:
        browser = await launch(p, netns, tmp_path, question)
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
    assert vx["keyPrompts"] == 0 and vx["tokens"] == 1  # probed, and no key is needed here


async def wait(page: Page, condition: str, timeout_s: float) -> None:
    """Wait until ``condition`` holds on the page; a timeout says what the page had then."""
    try:
        await page.wait_for_function(condition, timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        vx = await page.evaluate("window.voxlens")
        pytest.fail(f"no {condition} within {timeout_s} s; the page had {vx}")


HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Common characters that only the traditional script writes so (simplified: 们这个来说时会为国学…)
TRADITIONAL = set("們這個來說時會為國學麼嗎對沒點裡後過還長開問題氣見樣聽話語請謝現電東車愛與從當體實種"
                  "應經間頭發將動認讓邊總並無幾變關號親書錢歲買賣師業醫風飛馬魚鳥門陽陰聲藝術歡樂華"
                  "報紙網絡記憶價溫臺灣廣場處進運遠連達選寫讀")


async def test_page_in_chinese_holds_a_mandarin_conversation(  # type: ignore[no-untyped-def]
        ns_server: ServerProcess, netns: str, zh_speech, tmp_path: Path) -> None:
    recording, said = zh_speech[0]
    audio, rate = read_wav(recording)
    # Chromium loops the file: silence long enough that the question is not asked again (and
    # taken for barge-in) before the reply has been heard
    question = tmp_path / "question-zh.wav"
    write_wav(question, np.concatenate([np.zeros(rate // 2, np.float32), audio,
                                        np.zeros(rate * 20, np.float32)]), rate)
    async with async_playwright() as p:
        browser = await launch(p, netns, tmp_path, question)
        try:
            context = await browser.new_context(viewport={"width": 1200, "height": 800})
            page = await context.new_page()
            await page.goto(f"http://127.0.0.1:{ns_server.port}/")
            assert await page.text_content("#connect") == "Connect"  # Auto: English labels
            await page.select_option("#language", "zh")  # as a person picks 中文
            labels = {
                "lang": await page.get_attribute("html", "lang"),
                "picker": await page.text_content("label[for=language]"),
                "connect": await page.text_content("#connect"),
                "stop": await page.text_content("#stop"),
                "state": await page.text_content("#state"),
                "placeholder": await page.get_attribute("#text", "placeholder"),
                "latency": await page.text_content("#latency"),
            }
            assert labels == {"lang": "zh-CN", "picker": "语言", "connect": "连接", "stop": "停止回答",
                              "state": "未连接", "placeholder": "输入消息…",
                              "latency": "语音到语音：–"}, labels
            await page.click("#connect")
            await wait(page, "window.voxlens.sessionId !== null", 30)
            assert await page.text_content("#connect") == "断开"
            han = "/[\\u3400-\\u4dbf\\u4e00-\\u9fff]/"
            await wait(page, f"window.voxlens.finals.some((t) => {han}.test(t))", 120)
            await wait(page, f"Object.values(window.voxlens.replies).some((t) => {han}.test(t))", 60)
            await wait(page, "window.voxlens.playedMs > 0", 60)  # the reply's audio was heard
            state = await page.text_content("#state")
            vx = await page.evaluate("window.voxlens")
            await page.screenshot(path=str(ARTIFACTS / "page-zh.png"))
            # the choice is remembered; ?language= picks for one visit and is not remembered
            again = await context.new_page()
            await again.goto(f"http://127.0.0.1:{ns_server.port}/")
            remembered = (await again.input_value("#language"), await again.text_content("#send"))
            await again.goto(f"http://127.0.0.1:{ns_server.port}/?language=en")
            url_pick = (await again.input_value("#language"), await again.text_content("#send"))
            await again.set_viewport_size({"width": 390, "height": 844})
            await again.goto(f"http://127.0.0.1:{ns_server.port}/")
            remembered_after = await again.text_content("#send")
            await again.screenshot(path=str(ARTIFACTS / "page-zh-phone.png"))
            # a new choice while connected: English labels now, the language at the next connect
            await page.select_option("#language", "")
            switched = (await page.text_content("#connect"), await page.is_visible("#language-note"))
        finally:
            await browser.close()
    final = next(t for t in vx["finals"] if HAN.search(t))
    assert vx["language"] == "zh" and vx["labels"] == "zh"
    assert not TRADITIONAL & set(final), f"traditional script in {final!r}"
    heard = set(HAN.findall(said)) & set(HAN.findall(final))  # and it is what was said
    assert len(heard) >= len(set(HAN.findall(said))) / 4, (final, said)
    assert any(HAN.search(text) for text in vx["replies"].values()), vx["replies"]
    assert vx["audioEnergy"] > 0 and vx["playedMs"] > 0
    assert state in {"正在思考…", "正在说话", "正在听", "正在听…"}, state
    assert not vx["errors"], vx["errors"]
    assert remembered == ("zh", "发送") and url_pick == ("en", "Send") and remembered_after == "发送"
    assert switched == ("Disconnect", True)


# ---- a server with an access key, serving HTTPS itself ---------------------------------------

PAGE_KEY = "vx-page-key-8d1f3a7c52e04b96"
ADDRESS = "10.77.0.1"  # in the namespace only, on its loopback device


@pytest.fixture(scope="module")
def tls_server(netns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """voxlens serving HTTPS on ``ADDRESS`` (not loopback, so it needs its access key) with a
    self-signed certificate made here (small models)."""
    subprocess.run(["ip", "-n", netns, "addr", "add", f"{ADDRESS}/32", "dev", "lo"], check=True)
    folder = tmp_path_factory.mktemp("page-tls")
    cert, key = self_signed(folder, (ADDRESS,))
    port = free_port()
    log = ARTIFACTS / "server-page-tls.log"
    log.parent.mkdir(exist_ok=True)
    env = {**os.environ, "VOXLENS_SERVER__HOST": ADDRESS, "VOXLENS_SERVER__PORT": str(port),
           "VOXLENS_SERVER__TLS_CERT": str(cert), "VOXLENS_SERVER__TLS_KEY": str(key),
           "VOXLENS_AUTH__API_KEYS": json.dumps([PAGE_KEY]),
           "VOXLENS_AUTH__STATE_DIR": str(folder / "state"),
           "VOXLENS_WEBRTC__HOST_ADDRESSES": json.dumps([ADDRESS]),
           "VOXLENS_ASR__MODEL": "tiny.en", "VOXLENS_LLM__MODEL": "smollm2-135m",
           "VOXLENS_LLM__TEMPERATURE": "0", "VOXLENS_VISION__ENGINE": "none",
           "VOXLENS_TTS__VOICES": '{"en": "joe"}'}
    with log.open("wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "server.cli",
                                 "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(port, proc, log)
    # healthy when /healthz answers 200 over https, checked against the certificate
    health = f"https://{ADDRESS}:{port}/healthz"
    probe = (f"import ssl, urllib.request as u; u.urlopen({health!r}, timeout=2, "
             f"context=ssl.create_default_context(cafile={str(cert)!r}))")
    try:
        wait_serving(proc, log, lambda: subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", probe],
            capture_output=True).returncode == 0)
        yield server
    finally:
        server.stop()


# In the page: a token minted with the kept key opens wss://…/ws?token=… (browsers cannot set
# headers on a WebSocket); without it the handshake is refused. What each socket got first.
PAGE_WSS = """async () => {
  const resp = await fetch("/v1/tokens", {
    method: "POST", headers: { Authorization: "Bearer " + localStorage.getItem("voxlens.key") } });
  const { token } = await resp.json();
  const first = (url) => new Promise((resolve) => {
    const ws = new WebSocket(url);
    ws.onmessage = (m) => {
      resolve(JSON.parse(m.data).type);
      ws.send(JSON.stringify({ type: "session.end" }));
      ws.close();
    };
    ws.onclose = () => resolve("refused");
  });
  const base = location.origin.replace("https:", "wss:") + "/ws";
  return [location.protocol, await first(base + "?token=" + encodeURIComponent(token)),
          await first(base)];
}"""


async def test_page_over_https_asks_for_a_key_keeps_it_and_talks(
        tls_server: ServerProcess, netns: str, tmp_path: Path) -> None:
    silence = tmp_path / "silence.wav"  # a quiet microphone: the conversation is typed
    write_wav(silence, np.zeros(16_000, np.float32), 16_000)
    url = f"https://{ADDRESS}:{tls_server.port}/"
    async with async_playwright() as p:
        browser = await launch(p, netns, tmp_path, silence, ("--ignore-certificate-errors",))
        try:
            context = await browser.new_context(viewport={"width": 1200, "height": 800})
            page = await context.new_page()
            await page.goto(url)
            assert await page.is_hidden("#forget-key")
            # Connect: the server answers the probe 401, so the page asks for a key
            await page.click("#connect")
            await page.wait_for_selector("#key-dialog[open]")
            asked = {"focus": await page.evaluate("document.activeElement.id"),
                     "title": await page.text_content("#key-title"),
                     "label": await page.text_content("label[for=key-input]"),
                     "error": await page.is_visible("#key-error")}
            assert asked == {"focus": "key-input", "title": "Access key needed",
                             "label": "Access key", "error": False}, asked
            # a wrong key: said so, and asked again
            await page.fill("#key-input", PAGE_KEY + "-wrong")
            await page.click("#key-use")
            await wait(page, "window.voxlens.keyPrompts === 2", 30)
            await page.wait_for_selector("#key-dialog[open] #key-error:not([hidden])")
            refused = await page.text_content("#key-error")
            await page.screenshot(path=str(ARTIFACTS / "page-key.png"))
            # the right key: kept, exchanged for a token, connected over https
            await page.fill("#key-input", PAGE_KEY)
            await page.click("#key-use")
            await wait(page, "window.voxlens.sessionId !== null", 30)
            kept = await page.evaluate("localStorage.getItem('voxlens.key')")
            forget_shown = await page.is_visible("#forget-key")
            # a typed conversation, its reply heard over WebRTC
            await page.fill("#text", "What is the capital of France?")
            await page.click("#send")
            await wait(page, "Object.values(window.voxlens.replies).some((t) => t.trim())", 60)
            await wait(page, "window.voxlens.audioEnergy > 0", 60)
            wss = await page.evaluate(PAGE_WSS)
            vx = await page.evaluate("window.voxlens")
            # Disconnect, Connect: a new token from the kept key, nobody asked
            await page.click("#connect")
            await page.click("#connect")
            await wait(page, f"window.voxlens.sessionId !== {json.dumps(vx['sessionId'])}", 30)
            again = await page.evaluate("[window.voxlens.keyPrompts, window.voxlens.tokens]")
            # a new visit: the key is still kept
            later = await context.new_page()
            await later.goto(url)
            await later.click("#connect")
            await wait(later, "window.voxlens.sessionId !== null", 30)
            later_asked = await later.evaluate("window.voxlens.keyPrompts")
            await later.click("#connect")
            # Forget key: gone from the browser; the next Connect asks (in Chinese now)
            await later.click("#forget-key")
            forgotten = (await later.evaluate("localStorage.getItem('voxlens.key')"),
                         await later.is_hidden("#forget-key"))
            await later.select_option("#language", "zh")
            await later.click("#connect")
            await later.wait_for_selector("#key-dialog[open]")
            zh = {"title": await later.text_content("#key-title"),
                  "label": await later.text_content("label[for=key-input]"),
                  "use": await later.text_content("#key-use")}
            await later.click("#key-cancel")  # no key given: not connected, and why
            await later.wait_for_selector("#error:not([hidden])")
            cancelled = (await later.text_content("#error"), await later.text_content("#state"))
        finally:
            await browser.close()
    assert "did not accept" in refused, refused
    assert kept == PAGE_KEY and forget_shown
    assert any(text.strip() for text in vx["replies"].values()), vx["replies"]
    assert vx["errors"] == [refused], vx["errors"]  # the wrong key, nothing else
    assert vx["keyPrompts"] == 2 and vx["tokens"] == 1
    assert wss == ["https:", "session.ready", "refused"], wss
    assert again == [2, 2], again  # no new question; a token for each connection
    assert later_asked == 0
    assert forgotten == (None, True)
    assert zh == {"title": "需要访问密钥", "label": "访问密钥", "use": "连接"}, zh
    assert cancelled == ("这个服务器需要访问密钥。请按“连接”输入密钥。", "未连接"), cancelled
