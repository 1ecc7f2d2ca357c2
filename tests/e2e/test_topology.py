"""Several session nodes behind a real load balancer (issue 16, point 3): HAProxy (the Debian
package) with deploy/haproxy.cfg in front of two ``voxlens serve`` processes, all on
127.0.0.1. Sessions spread over both nodes and stay on theirs; tokens minted by one node work
on the other (a shared secret); the page and /metrics pass through; a node drained with
SIGTERM finishes its conversations while new sessions go to the other, then exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from client.common.ws_client import VoxlensClient
from server.launch import Fleet, ServerProcess, spawn_fleet
from tests.conftest import ARTIFACTS, until

KEY = "vx-topology-key-4b8e1f0a2c"
SECRET = "topology-shared-token-secret-0123456789abcdef"  # one secret: tokens work on every node
GUARD_S = 90.0


def get(url: str, key: str | None = KEY) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def sessions(node: ServerProcess) -> int:
    return int(json.loads(get(f"{node.http}/healthz", None)[1])["sessions"])


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    env = {"VOXLENS_AUTH__API_KEYS": json.dumps([KEY]), "VOXLENS_AUTH__TOKEN_SECRET": SECRET,
           "VOXLENS_LIMITS__SESSIONS_PER_CLIENT": "0", "VOXLENS_LIMITS__CONNECTIONS_PER_MINUTE": "0",
           "VOXLENS_LLM__TEMPERATURE": "0", "VOXLENS_SERVER__DRAIN_TIMEOUT_S": "60",
           "VOXLENS_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]'}
    # HAProxy runs deploy/haproxy.cfg itself, its addresses from the environment
    f = spawn_fleet(2, ARTIFACTS, env=env)
    try:
        yield f
    finally:
        f.stop()


async def test_sessions_spread_stay_and_survive_a_drained_node(fleet: Fleet) -> None:
    node1, node2 = fleet.nodes
    # the page, /metrics and tokens pass through the balancer
    assert get(f"{fleet.http}/", None)[0] == 200
    assert get(f"{fleet.http}/metrics")[0] == 200 and get(f"{fleet.http}/metrics", None)[0] == 401
    _, body = await asyncio.to_thread(_post, f"http://127.0.0.1:{node1.port}/v1/tokens")
    token = json.loads(body)["token"]
    async with VoxlensClient(f"ws://127.0.0.1:{node2.port}/ws?token={token}") as other_node:
        assert other_node.ready is not None  # a token of node1 opens a session on node2

    clients = [VoxlensClient(fleet.ws, api_key=KEY) for _ in range(8)]
    for c in clients:
        await c.__aenter__()
    try:
        assert (sessions(node1), sessions(node2)) == (4, 4)  # leastconn spreads them
        for c in clients:  # each session stays where it is (a WebSocket is one connection)
            await c.say("What is two plus two?")
        for c in clients:
            reply = await c.wait_reply(timeout_s=GUARD_S)
            assert reply.text
        assert (sessions(node1), sessions(node2)) == (4, 4)

        node1.proc.send_signal(signal.SIGTERM)  # drain node1
        await until(lambda: fleet.status().get("node1") != "UP", GUARD_S)
        assert get(f"{node1.http}/healthz", None)[0] == 503
        late = [VoxlensClient(fleet.ws, api_key=KEY) for _ in range(4)]
        for c in late:  # new sessions go to node2 only
            await c.__aenter__()
        assert (sessions(node1), sessions(node2)) == (4, 8)
        for c in clients:  # node1's conversations go on while it drains
            await c.say("What is the capital of France?")
        answers = [await c.wait_reply(timeout_s=GUARD_S) for c in clients]
        assert all("paris" in a.text.lower() for a in answers), [a.text for a in answers]
        for c in late:
            await c.__aexit__(None, None, None)
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)
    # its conversations over, the drained node exits 0 by itself
    assert await asyncio.to_thread(node1.proc.wait, GUARD_S) == 0
    assert "drained: 0 sessions closed" in node1.log.read_text("utf-8")
    assert fleet.status()["node1"] != "UP" and fleet.status()["node2"] == "UP"


def _post(url: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method="POST", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.status, r.read()
