"""Graceful drain (issue 16, point 4): a node stops taking sessions, lets the running ones
finish, closes what is left with ``session.closing``, then exits 0. In-process with fake
engines for the logic (POST /admin/drain), and a real ``voxlens serve`` for SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from client.common.ws_client import VoxlensClient
from pipelines.engines.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad
from pipelines.session import Engines
from server.app import DRAINED, create_app
from server.launch import spawn_server
from server.settings import load_settings
from server.state import STATE
from tests.conftest import ARTIFACTS
from tests.e2e.test_limits import KEY_A, Peer, bearer, until


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, drained: asyncio.Event) -> AsyncIterator[tuple[web.Application, str]]:
    settings = load_settings(auth={"api_keys": [KEY_A], "state_dir": tmp_path},
                             server={"drain_timeout_s": 2.0},
                             limits={"texts_per_second": 0, "connections_per_minute": 0})
    engines = Engines(FakeVad(), FakeAsr(latency_s=0.01),
                      FakeLlm(reply="Ok.", first_token_s=0.0, token_s=0.0),
                      FakeTts(ms_per_char=1.0, latency_s=0.0))
    app = create_app(settings, lambda settings, compute: engines)
    app[DRAINED] = drained.set
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        await until(lambda: app[STATE].engines is not None, "the fake engines")
        host, port = runner.addresses[0][:2]
        yield app, f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def test_admin_drain_refuses_new_sessions_lets_running_ones_go_on_then_closes_them(
        tmp_path: Path) -> None:
    drained = asyncio.Event()
    async with serve(tmp_path, drained) as (app, base), aiohttp.ClientSession() as http:
        running = Peer(await http.ws_connect(f"{base}/ws", headers=bearer(KEY_A)))
        await until(lambda: running.events, "session.ready")
        async with http.post(f"{base}/v1/tokens", headers=bearer(KEY_A)) as r:
            token = (await r.json())["token"]
        async with http.post(f"{base}/admin/drain", headers=bearer(token)) as r:
            assert r.status == 403  # a token cannot drain the node
        assert not app[STATE].draining
        async with http.post(f"{base}/admin/drain", headers=bearer(KEY_A)) as r:
            assert r.status == 202 and (await r.json())["sessions"] == 1
        async with http.get(f"{base}/healthz") as r:
            health = await r.json()
            assert r.status == 503 and health["draining"] is True and not health["ready"]
        refused = Peer(await http.ws_connect(f"{base}/ws", headers=bearer(KEY_A)))
        assert await refused.ended() == 1013
        assert refused.first["code"] == "draining" and refused.first["fatal"]
        await running.answers()  # the running conversation goes on
        assert await running.ended() == 1000  # ... until the drain's time is up
        closing = running.events[-1]
        assert closing["type"] == "session.closing" and closing["reason"] == "draining"
        assert closing["reconnect"] is True
        await asyncio.wait_for(drained.wait(), 30)
        assert not app[STATE].sessions


async def test_a_drain_with_no_sessions_ends_at_once_and_twice_is_once(tmp_path: Path) -> None:
    drained = asyncio.Event()
    async with serve(tmp_path, drained) as (_, base), aiohttp.ClientSession() as http:
        for started in (True, False):
            async with http.post(f"{base}/admin/drain", headers=bearer(KEY_A)) as r:
                assert (await r.json())["started"] is started
        await asyncio.wait_for(drained.wait(), 30)


async def test_sigterm_drains_a_real_server_which_then_exits_0() -> None:
    server = spawn_server(ARTIFACTS / "server-drain.log", env={
        "VOXLENS_SERVER__DRAIN_TIMEOUT_S": "20", "VOXLENS_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]'})
    try:
        async with VoxlensClient(server.ws) as client:
            server.proc.send_signal(signal.SIGTERM)
            await until(lambda: _health(server.http)[0] == 503, "healthz 503")
            assert _health(server.http)[1]["draining"] is True
            await client.say("What is the capital of France?")  # still answered
            reply = await client.wait_reply(timeout_s=60)
            assert "paris" in reply.text.lower()
        # the client left: the drain ends before its timeout, and the process exits 0
        code = await asyncio.to_thread(server.proc.wait, 60)
        assert code == 0
        log = server.log.read_text("utf-8")
        assert "draining: 1 sessions running" in log and "drained: 0 sessions closed" in log
    finally:
        if server.proc.poll() is None:
            server.stop()


def _health(base: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
