"""Deploying safely, against real servers on loopback: access keys and tokens on every protected
endpoint, origin checks, the refusal to serve a public address without keys, HTTPS/WSS with a
self-signed certificate, the Python clients with a key (``--api-key``, ``VOXLENS_API_KEY``:
a token for each connection, a clear error for a wrong key), and logs without transcripts,
replies or credentials."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import jwt
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from skimage import data as photos

from client.common import access
from client.common.links import Connection, Incoming, WsLink
from client.common.rtc_client import MicrophoneTrack
from client.common.wavio import read_wav, write_wav
from client.common.ws_client import VoxlensClient
from client.speaker.app import Speaker, SpeakerOptions
from client.speaker.audio import FileAudio
from server.launch import ServerProcess, free_port, spawn_server
from streaming.webrtc import EVENTS_LABEL, restrict_host_candidates
from tests.conftest import ARTIFACTS, Server, speak, until
from tests.tls import self_signed, wait_serving

KEY = "vx-test-key-3b9f0c41d2a84e6f"
FILE_KEY = "vx-file-key-one-77ad01c9"
NEW_FILE_KEY = "vx-file-key-two-1e5a9b30"
ALLOWED = "https://app.example.test"
QUESTION = "What is the capital of France?"
TYPED = "What is the capital of Italy?"


@dataclass
class Secure:
    server: ServerProcess
    keys_file: Path
    state_dir: Path
    minted: list[str] = field(default_factory=list)  # every token handed out, for the log test
    replies: list[str] = field(default_factory=list)  # every reply text, for the log test

    @property
    def http(self) -> str:
        return self.server.http


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    """The real server (default models) with a key in the environment, a keys file, a token
    secret in a temporary state directory and one extra allowed origin."""
    folder = tmp_path_factory.mktemp("auth")
    keys_file = folder / "keys"
    keys_file.write_text(f"# test devices\n{FILE_KEY}\n\n")
    state_dir = folder / "state"
    s = spawn_server(ARTIFACTS / "server-auth.log", env={
        "VOXLENS_AUTH__API_KEYS": json.dumps([KEY]),
        "VOXLENS_AUTH__API_KEYS_FILE": str(keys_file),
        "VOXLENS_AUTH__STATE_DIR": str(state_dir),
        "VOXLENS_SERVER__ALLOWED_ORIGINS": json.dumps([ALLOWED]),
        "VOXLENS_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]',
        "VOXLENS_LLM__TEMPERATURE": "0"})
    yield Secure(s, keys_file, state_dir)
    s.stop()


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def mint(secure: Secure, key: str = KEY) -> str:
    async with aiohttp.ClientSession() as http, \
            http.post(f"{secure.http}/v1/tokens", headers=bearer(key)) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    assert abs(body["expires_at"] - (time.time() + 600)) < 60
    secure.minted.append(body["token"])
    return str(body["token"])


def forged(secure: Secure, token: str, **claims: Any) -> str:
    """``token`` re-signed with the server's own secret and ``claims`` changed."""
    secret = (secure.state_dir / "token_secret").read_bytes().strip()
    original = jwt.decode(token, options={"verify_signature": False})
    return jwt.encode({**original, **claims}, secret, algorithm="HS256")


def tampered(token: str) -> str:
    """The payload changed (a later expiry), the signature kept."""
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["exp"] += 3600
    raw = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{raw}.{signature}"


def jpeg() -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(photos.coffee(), cv2.COLOR_RGB2BGR))
    assert ok
    return bytes(buf)


async def health(base: str, ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"{base}/healthz", ssl=ssl_context or True) as r:
        return dict(await r.json())


async def settled(base: str, before: dict[str, Any]) -> None:
    """No session was made, and no task was left behind (connections wind down by themselves)."""
    async def back() -> bool:
        now = await health(base)
        return bool(now["sessions"] == before["sessions"] and now["tasks"] <= before["tasks"])
    await until(back, timeout_s=10)


PROTECTED = [("GET", "/ws"), ("POST", "/offer"), ("POST", "/v1/vision/ask"),
             ("POST", "/v1/tokens"), ("GET", "/metrics"), ("GET", "/v1/realtime"),
             ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/audio/speech"),
             ("POST", "/v1/chat/completions"), ("GET", "/v1/models")]


async def test_no_valid_credential_no_entry(secure: Secure) -> None:
    before = await health(secure.http)
    token = await mint(secure)
    bad = {"none": {}, "wrong key": bearer(KEY + "x"), "key of another server": bearer("k" * 30),
           "expired token": bearer(forged(secure, token, exp=int(time.time()) - 3600)),
           "tampered token": bearer(tampered(token)),
           "token of an unknown key": bearer(forged(secure, token, sub="key-0000000000000000")),
           "not bearer": {"Authorization": f"Basic {KEY}"}}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for method, path in PROTECTED:
            for why, headers in bad.items():
                async with http.request(method, f"{secure.http}{path}", headers=headers,
                                        json={"sdp": "x", "type": "offer"}) as r:
                    assert r.status == 401, (path, why, r.status)
                    body = await r.json()
                    assert body["error"] == "unauthorized" and body["message"], (path, why)
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
        # the WebSocket handshake itself is refused: no upgrade, so no session.ready
        for url in [f"{secure.server.ws}", f"{secure.server.ws}?token={KEY}",
                    f"{secure.server.ws}?token={tampered(token)}",
                    f"{secure.server.ws}?token={forged(secure, token, exp=1)}"]:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(url)
            assert refused.value.status == 401
        # the open endpoints stay open
        for path in ["/healthz", "/", "/webrtc/config", "/static/app.js"]:
            async with http.get(f"{secure.http}{path}") as r:
                assert r.status == 200, path
    await settled(secure.http, before)


async def ws_ready(url: str, **kwargs: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.ws_connect(url, **kwargs) as ws:
        ready = await ws.receive_json(timeout=30)
        await ws.send_json({"type": "session.end"})
    return dict(ready)


async def webrtc_session(base: str, headers: dict[str, str]) -> str:
    """A real WebRTC session opened with ``headers``: its session.ready on the data channel."""
    restrict_host_candidates(["127.0.0.1"])
    pc = RTCPeerConnection()
    events: asyncio.Queue[str] = asyncio.Queue(16)
    channel = pc.createDataChannel(EVENTS_LABEL)
    channel.on("message", lambda raw: events.put_nowait(raw) if isinstance(raw, str) else None)
    pc.addTrack(MicrophoneTrack())
    try:
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http, \
                http.post(f"{base}/offer", headers=headers, json={
                    "sdp": pc.localDescription.sdp, "type": "offer"}) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        ready = json.loads(await asyncio.wait_for(events.get(), 30))
        assert ready["session_id"] == answer["session_id"]
        return str(ready["type"])
    finally:
        await pc.close()


async def test_a_key_or_a_token_opens_every_endpoint(secure: Secure) -> None:
    token = await mint(secure)
    file_token = await mint(secure, FILE_KEY)  # keys from the file work too, under another name
    subs = {jwt.decode(t, options={"verify_signature": False})["sub"] for t in (token, file_token)}
    assert len(subs) == 2 and all(s.startswith("key-") for s in subs)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{secure.http}/v1/tokens", headers=bearer(token)) as r:
            assert r.status == 403 and (await r.json())["error"] == "forbidden"  # no chains
        for credential in (KEY, token):
            async with http.get(f"{secure.http}/metrics", headers=bearer(credential)) as r:
                assert r.status == 200 and "voxlens_sessions" in await r.text()
        form = aiohttp.FormData()
        form.add_field("image", jpeg(), filename="coffee.jpg", content_type="image/jpeg")
        form.add_field("question", "What is this?")
        async with http.post(f"{secure.http}/v1/vision/ask", data=form, headers=bearer(KEY)) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["answer"]
        async with http.post(f"{secure.http}/v1/vision/ask", json={"image": "bm90IGFuIGltYWdl"},
                             headers=bearer(token)) as r:  # past the door, then judged
            assert r.status == 400 and (await r.json())["error"] == "bad_image"
        async with http.post(f"{secure.http}/offer", data=b"not json",
                             headers=bearer(KEY)) as r:
            assert r.status == 400 and (await r.json())["error"] == "bad_message"
    for kwargs in [{"headers": bearer(KEY)}, {"headers": bearer(token)}, {}]:
        url = secure.server.ws + ("" if kwargs else f"?token={token}")
        assert (await ws_ready(url, **kwargs))["type"] == "session.ready"
    assert await webrtc_session(secure.http, bearer(token)) == "session.ready"


async def test_pages_of_other_origins_are_refused(secure: Secure, server: Server) -> None:
    token = await mint(secure)
    port = secure.server.port
    async with aiohttp.ClientSession() as http:
        for base, headers in [(secure.http, bearer(KEY)), (server.http, {})]:  # keys or not
            for origin in ["http://evil.example", f"http://127.0.0.1:{port + 1}", "null"]:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(f"{base.replace('http', 'ws')}/ws", origin=origin,
                                          headers=headers)
                assert refused.value.status == 403
                for path in ["/offer", "/v1/vision/ask", "/v1/tokens"]:
                    async with http.post(f"{base}{path}", headers={**headers, "Origin": origin},
                                         json={"sdp": "x", "type": "offer"}) as r:
                        assert r.status == 403, (base, path, origin)
                        assert (await r.json())["error"] == "forbidden_origin"
    # the server's own page, localhost on its port, and the listed origin are welcome
    for origin in [f"http://127.0.0.1:{port}", f"http://localhost:{port}", ALLOWED]:
        ready = await ws_ready(f"{secure.server.ws}?token={token}", origin=origin)
        assert ready["type"] == "session.ready", origin
    assert (await ws_ready(server.ws, origin=f"http://127.0.0.1:{server.port}"))["type"] \
        == "session.ready"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{secure.http}/v1/tokens",
                             headers={**bearer(KEY), "Origin": ALLOWED}) as r:
            assert r.status == 200
            secure.minted.append((await r.json())["token"])
        # the page's probe on a server without keys: a token (valid only while it has none)
        async with http.post(f"{server.http}/v1/tokens",
                             headers={"Origin": f"http://127.0.0.1:{server.port}"}) as r:
            assert r.status == 200 and (await r.json())["token"]


async def test_sighup_rereads_the_keys_file(secure: Secure) -> None:
    old_token = await mint(secure, FILE_KEY)
    secure.keys_file.write_text(f"{NEW_FILE_KEY}\n")
    os.kill(secure.server.proc.pid, signal.SIGHUP)

    async def status(key: str) -> int:
        async with aiohttp.ClientSession() as http, \
                http.get(f"{secure.http}/metrics", headers=bearer(key)) as r:
            return r.status
    async def reread() -> bool:
        return await status(NEW_FILE_KEY) == 200
    await until(reread, timeout_s=10)
    assert await status(FILE_KEY) == 401
    assert await status(old_token) == 401  # a removed key's tokens go with it
    assert await status(KEY) == 200  # the keys of the settings stay
    assert secure.server.proc.poll() is None  # SIGHUP did not end the server


def test_serving_a_public_address_without_keys_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXLENS_AUTH")}
    port = str(free_port())
    refused = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--host", "0.0.0.0",
                              "--port", port], env=env, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2
    assert "without access keys" in refused.stderr and "--insecure" in refused.stderr
    assert "serving" not in refused.stdout
    # --insecure: the operator means it (bound to every interface briefly, reached on loopback)
    light = {**env, "VOXLENS_ASR__MODEL": "tiny.en", "VOXLENS_LLM__MODEL": "smollm2-135m",
             "VOXLENS_VISION__ENGINE": "none"}
    with (tmp_path / "insecure.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--host", "0.0.0.0",
                                 "--port", port, "--insecure"], env=light, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        while not _answers(f"http://127.0.0.1:{port}/healthz"):
            assert proc.poll() is None, (tmp_path / "insecure.log").read_text()
            try:
                proc.wait(0.2)
            except subprocess.TimeoutExpired:
                pass
    finally:
        proc.terminate()
        proc.wait(20)
    assert "no access keys" in (tmp_path / "insecure.log").read_text()


def _answers(url: str, context: ssl.SSLContext | None = None) -> int | None:
    """The HTTP status of ``url`` (503 while models load), or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


# ---- HTTPS / WSS -----------------------------------------------------------------------------

@dataclass
class Tls:
    server: ServerProcess
    trust: ssl.SSLContext

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    @property
    def wss(self) -> str:
        return f"wss://127.0.0.1:{self.server.port}/ws"


@pytest.fixture(scope="module")
def tls(secure: Secure, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    """A second server serving HTTPS/WSS itself (small models), with the same keys and the same
    state directory as ``secure``: a second node sharing the token secret."""
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    trust = ssl.create_default_context(cafile=str(cert))
    port = free_port()
    log = ARTIFACTS / "server-tls.log"
    env = {**os.environ, "VOXLENS_SERVER__HOST": "127.0.0.1", "VOXLENS_SERVER__PORT": str(port),
           "VOXLENS_SERVER__TLS_CERT": str(cert), "VOXLENS_SERVER__TLS_KEY": str(key),
           "VOXLENS_AUTH__API_KEYS": json.dumps([KEY]),
           "VOXLENS_AUTH__STATE_DIR": str(secure.state_dir),
           "VOXLENS_ASR__MODEL": "tiny.en", "VOXLENS_LLM__MODEL": "smollm2-135m",
           "VOXLENS_LLM__TEMPERATURE": "0", "VOXLENS_VISION__ENGINE": "none",
           "VOXLENS_TTS__VOICES": '{"en": "joe"}'}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(port, proc, log)
    try:
        wait_serving(proc, log,
                     lambda: _answers(f"https://127.0.0.1:{port}/healthz", trust) == 200)
        yield Tls(server, trust)
    finally:
        server.stop()


async def test_a_typed_conversation_over_wss(tls: Tls, secure: Secure) -> None:
    token = await mint(secure)  # minted by the other node: the two share the token secret
    assert stat.S_IMODE((secure.state_dir / "token_secret").stat().st_mode) == 0o600
    with pytest.raises(aiohttp.ClientConnectorCertificateError):  # an untrusted certificate
        await health(tls.https)
    assert (await health(tls.https, tls.trust))["ready"] is True
    audio = 0
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(f"{tls.wss}?token={token}", ssl=tls.trust) as ws:
        assert (await ws.receive_json(timeout=30))["type"] == "session.ready"
        await ws.send_json({"type": "text", "text": TYPED})
        async with asyncio.timeout(90):
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    audio += len(msg.data)
                    continue
                event = json.loads(msg.data)
                assert event["type"] != "error", event
                if event["type"] == "reply.done":
                    secure.replies.append(event["text"])
                    break
    assert secure.replies[-1].strip() and audio > 24_000  # > 0.5 s of 24 kHz s16le
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(tls.wss, ssl=tls.trust)
        assert refused.value.status == 401


# ---- the Python clients with a key (--api-key, VOXLENS_API_KEY) ---------------------------

async def voxlens(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``voxlens ARGS`` as a child process (no VOXLENS_API_KEY unless ``env`` sets it): its
    exit code, stdout and stderr."""
    base = {k: v for k, v in os.environ.items() if k != "VOXLENS_API_KEY"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", *args, env={**base, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def refused_cleanly(result: tuple[int, str, str], why: str) -> None:
    """Exit code 1 and one ``error:`` line that says ``why``; no traceback."""
    code, _, err = result
    assert code == 1, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and why in errors[0], err


async def test_talk_with_an_api_key(secure: Secure) -> None:
    talk = ("talk", "--url", secure.server.ws, "--text", TYPED, "--timeout", "60")
    ok, wrong, none, wrong_rtc = await asyncio.gather(
        voxlens(*talk, "--api-key", KEY),
        voxlens(*talk, "--api-key", KEY + "x"),
        voxlens(*talk),
        voxlens(*talk, "--transport", "webrtc", "--ice-host", "127.0.0.1",
                env={"VOXLENS_API_KEY": "k" * 30}))
    code, out, err = ok
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["type"] == "session.ready" and not any(e["type"] == "error" for e in events)
    reply = next(e for e in events if e["type"] == "reply.done")["text"]
    assert reply.strip()
    secure.replies.append(reply)
    refused_cleanly(wrong, "did not accept the access key")
    refused_cleanly(none, "needs an access key")
    refused_cleanly(wrong_rtc, "did not accept the access key")


async def test_speaker_over_websocket_with_the_key_in_the_environment(  # type: ignore[no-untyped-def]
        secure: Secure, voice, tmp_path: Path) -> None:
    audio, rate = speak(voice, "What is the capital of Spain?")
    wav, out = tmp_path / "question.wav", tmp_path / "reply.wav"
    write_wav(wav, np.concatenate([np.zeros(rate // 2, np.float32), audio]), rate)
    speaker = ("speaker", "--url", secure.server.ws, "--input-file", str(wav),
               "--language", "en", "--json", "--timeout", "90")
    ok, wrong = await asyncio.gather(
        voxlens(*speaker, "--output-file", str(out), env={"VOXLENS_API_KEY": KEY}),
        voxlens(*speaker, env={"VOXLENS_API_KEY": KEY + "x"}))
    code, stdout, err = ok
    assert code == 0, err
    events = [json.loads(line) for line in stdout.splitlines()]
    assert events[0]["type"] == "session.ready"
    final = next(e for e in events if e["type"] == "transcript" and e["final"])["text"]
    assert "capital of spain" in final.lower(), final
    reply = next(e for e in events if e["type"] == "reply.done")["text"]
    assert reply.strip()
    secure.replies += [final, reply]
    played, played_rate = read_wav(out)
    assert played.size > played_rate // 2  # more than half a second of the reply was played
    refused_cleanly(wrong, "did not accept the access key")


class CutOnce:
    """A link whose first connection drops as soon as the session is ready (a network drop)."""

    def __init__(self, link: WsLink) -> None:
        self.link, self.name, self.resend_start = link, link.name, link.resend_start
        self.connects = 0

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Connection]:
        async with self.link.connect() as conn:
            self.connects += 1
            yield _Cut(conn) if self.connects == 1 else conn


class _Cut:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def send(self, message: dict[str, Any]) -> None:
        await self.conn.send(message)

    async def send_audio(self, pcm: bytes) -> None:
        await self.conn.send_audio(pcm)

    async def incoming(self) -> AsyncIterator[Incoming]:
        async for item in self.conn.incoming():
            yield item
            if isinstance(item, dict) and item.get("type") == "session.ready":
                raise ConnectionError("cut by the test")


async def test_speaker_mints_a_token_for_each_connection(  # type: ignore[no-untyped-def]
        secure: Secure, voice, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    minted: list[str] = []
    real_mint = access.mint

    async def counted(http: aiohttp.ClientSession, url: str, key: str) -> access.Token:
        token = await real_mint(http, url, key)
        minted.append(token.value)
        return token
    monkeypatch.setattr(access, "mint", counted)
    audio, rate = speak(voice, "What is the capital of France?")
    wav = tmp_path / "question.wav"
    write_wav(wav, np.concatenate([np.zeros(rate // 2, np.float32), audio]), rate)
    link = CutOnce(WsLink(secure.server.ws, api_key=KEY))
    shown = io.StringIO()
    speaker = Speaker(link, FileAudio(wav, None, 16000, 16000),
                      SpeakerOptions(output_rate=16000, language="en"), out=shown)
    assert await speaker.run() == 0
    assert link.connects == 2 and len(minted) == 2  # reconnected by itself, with a new token
    lines = shown.getvalue().splitlines()
    assert any(line.startswith("assistant: ") for line in lines), lines
    secure.minted += minted
    secure.replies += [line.split(": ", 1)[1] for line in lines]


async def test_desktop_with_an_api_key(secure: Secure, tmp_path: Path) -> None:
    silence = tmp_path / "silence.wav"
    write_wav(silence, np.zeros(16_000, np.float32), 16_000)
    desktop = ("desktop", "--headless", "--url", secure.http, "--no-camera", "--mic-file",
               str(silence), "--record", str(tmp_path / "reply.wav"), "--ice-host", "127.0.0.1")
    refused_cleanly(await voxlens(*desktop, "--api-key", KEY + "x"),
                    "did not accept the access key")
    base = {k: v for k, v in os.environ.items() if k != "VOXLENS_API_KEY"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", *desktop, "--api-key", KEY, env=base,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            while True:
                line = await proc.stdout.readline()
                assert line, "the desktop app ended before its session was ready"
                if json.loads(line)["type"] == "session.ready":
                    break
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()


# ---- privacy -------------------------------------------------------------------------------

async def test_logs_carry_no_transcript_reply_or_credential(secure: Secure, tls: Tls,
                                                            voice) -> None:  # type: ignore[no-untyped-def]
    """Runs last: a spoken conversation, then both servers' logs (at INFO) are read."""
    token = await mint(secure)
    audio, rate = speak(voice, QUESTION)
    async with VoxlensClient(f"{secure.server.ws}?token={token}") as client:
        await client.stream_audio(audio, rate)
        reply = await client.wait_reply(timeout_s=60)
    assert reply.transcript and "capital" in reply.transcript.lower()
    assert "paris" in reply.text.lower()
    secure.replies.append(reply.text)
    logs = (secure.server.log.read_text(errors="replace")
            + tls.server.log.read_text(errors="replace")).lower()
    assert "session" in logs and "/ws" in logs  # the logs are there, and they are read
    secrets = [KEY, FILE_KEY, NEW_FILE_KEY, *secure.minted]
    words = ["capital", "france", "italy", "paris", reply.transcript, *secure.replies]
    for text in [*secrets, *words]:
        assert text.lower().strip() not in logs, f"{text[:30]!r} is in a server log"
    secret = (secure.state_dir / "token_secret").read_text().strip().lower()
    assert secret not in logs


async def test_turn_credentials_go_only_to_clients_with_a_credential(tmp_path: Path) -> None:
    """/webrtc/config stays open (the page reads it), but on a server with keys the TURN
    servers it lists, whose credentials let anyone relay through them, are given only to a
    request with a valid key or token."""
    turn = {"urls": ["turn:127.0.0.1:3478?transport=udp"], "username": "voxlens",
            "credential": "turn-secret-7"}
    stun = {"urls": ["stun:127.0.0.1:3478"]}
    server = spawn_server(tmp_path / "turn.log", env={
        "VOXLENS_AUTH__API_KEYS": json.dumps([KEY]),
        "VOXLENS_AUTH__STATE_DIR": str(tmp_path / "state"),
        "VOXLENS_WEBRTC__ICE_SERVERS": json.dumps([stun, turn]),
        "VOXLENS_ASR__MODEL": "tiny.en", "VOXLENS_LLM__MODEL": "smollm2-135m",
        "VOXLENS_VISION__ENGINE": "none", "VOXLENS_TTS__VOICES": '{"en": "joe"}'})
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.http}/v1/tokens", headers=bearer(KEY)) as r:
                token = (await r.json())["token"]

            async def config(headers: dict[str, str]) -> tuple[int, str]:
                async with http.get(f"{server.http}/webrtc/config", headers=headers) as r:
                    return r.status, await r.text()

            for headers in [{}, bearer("not-a-key"), bearer(tampered(token))]:
                status, body = await config(headers)
                assert status == 200 and json.loads(body) == {"iceServers": [stun]}
                assert "turn-secret-7" not in body
            for credential in [KEY, token]:
                status, body = await config(bearer(credential))
                assert status == 200 and json.loads(body) == {"iceServers": [stun, turn]}
    finally:
        server.stop()
