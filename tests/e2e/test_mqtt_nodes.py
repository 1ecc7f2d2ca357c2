"""Several voxlens nodes on one broker (docs/ARCHITECTURE.md, "MQTT across nodes"), on a real
mosquitto with the documented ACLs: in-process nodes with scripted engines for the logic around
the models (two starts at once, a drain handing a conversation over, devices kept out of the
nodes' records), and real ``voxlens serve`` processes with the packaged models for ten devices
and a node killed with SIGKILL, and for a node drained with SIGTERM that ``voxlens speaker``
leaves by itself."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from client.common.links import MqttLink
from client.common.wavio import write_wav
from client.speaker.app import Speaker, SpeakerOptions
from client.speaker.audio import FileAudio
from pipelines.compute import Compute
from pipelines.engines.base import ChatMessage
from pipelines.engines.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad
from pipelines.session import Engines
from server.engines import session_config
from server.launch import ServerProcess, free_port, spawn_server
from server.mqtt import ClusterBridge
from server.settings import load_settings
from server.state import AppState
from streaming.mqtt_records import Claim, Presence, decode_history, parse_cluster_topic
from tests.broker import Broker
from tests.conftest import ARTIFACTS, speak, until
from tests.e2e.test_mqtt import Device, health

PREFIX = "vx/nodes"
GROUP = "voxlens"
DEVICES = [f"nd-{k}" for k in range(1, 15)] + ["nd-speaker"]
NAMES = ["Alice", "Bruno", "Chloe", "David", "Emma", "Felix", "Grace", "Henry", "Irene", "James"]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """mosquitto with four node users on the prefix (three nodes and an observer)."""
    b = Broker(tmp_path_factory.mktemp("mosquitto-nodes"), free_port(), [PREFIX], nodes=4,
               devices=DEVICES)
    b.start()
    yield b
    b.stop()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "mosquitto-nodes.log").write_bytes(b.log.read_bytes())


@dataclass
class Records:
    """What the nodes keep on the broker, as another node reads it: presence, owners and the
    carried conversations (``<prefix>/$cluster/#``)."""

    nodes: dict[str, Presence | None] = field(default_factory=dict)
    owners: dict[str, Claim | None] = field(default_factory=dict)
    conversations: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def add(self, name: str, payload: bytes) -> None:
        record = parse_cluster_topic(PREFIX, name)
        assert record is not None, name
        kind, key = record
        if kind == "node":
            self.nodes[key] = Presence.decode(payload)
        elif kind == "owner":
            self.owners[key] = Claim.decode(payload)
        elif kind == "state":
            self.conversations[key] = list(decode_history(payload))

    def owner(self, device: str) -> str | None:
        claim = self.owners.get(device)
        return claim.node if claim is not None and claim.serving else None


@contextlib.asynccontextmanager
async def observer(broker: Broker) -> AsyncIterator[Records]:
    """Reads the nodes' records with the last node user's rights, until left."""
    records = Records()
    user = broker.node_users[PREFIX][-1]
    async with aiomqtt.Client("127.0.0.1", broker.port, username=user,
                              password=broker.passwords[user]) as client:
        await client.subscribe(f"{PREFIX}/$cluster/#", qos=1)

        async def read() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                records.add(str(message.topic), message.payload)
        reader = asyncio.create_task(read())
        try:
            yield records
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


# ---- in process, scripted engines --------------------------------------------------------


def recalling(messages: Sequence[ChatMessage]) -> str:
    """A scripted LLM that answers with everything the person said in the conversation, so a
    reply shows which conversation the session had."""
    return "You said: " + " | ".join(m.content for m in messages if m.role == "user")


@contextlib.asynccontextmanager
async def node(broker: Broker, index: int) -> AsyncIterator[ClusterBridge]:
    """A node in this process (its own state, scheduler and scripted engines) until left."""
    settings = load_settings(mqtt={"url": broker.url(broker.node_users[PREFIX][index]),
                                   "prefix": PREFIX, "share_group": GROUP,
                                   "node_id": f"n{index + 1}"})
    compute = Compute()
    state = AppState(settings, compute, session_config(settings))
    state.engines = Engines(FakeVad(), FakeAsr(), FakeLlm(reply=recalling, first_token_s=0.01,
                                                          token_s=0.001), FakeTts())
    bridge = ClusterBridge(state, settings.mqtt)
    bridge.fleet.settle_s = 0.0  # (a fresh test broker: no node is reconnecting)
    task = asyncio.create_task(bridge.run())
    try:
        await until(lambda: bridge.shared, timeout_s=30)
        yield bridge
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        compute.close()


@contextlib.asynccontextmanager
async def two_nodes(broker: Broker) -> AsyncIterator[tuple[ClusterBridge, ClusterBridge]]:
    async with node(broker, 0) as n1, node(broker, 1) as n2:
        await until(lambda: len(n1.fleet.nodes) == len(n2.fleet.nodes) == 2)
        yield n1, n2


def serving(nodes: Sequence[ClusterBridge], device: str) -> list[str]:
    return [n.node_id for n in nodes if device in n.devices]


async def test_two_starts_at_once_leave_the_device_with_one_node(broker: Broker) -> None:
    async with two_nodes(broker) as nodes, observer(broker) as records, \
            Device(broker, "nd-1", prefix=PREFIX) as device:
        start = {"type": "session.start", "output_audio": {"sample_rate": 16000}}
        await asyncio.gather(*(device.send(start) for _ in range(4)))  # a device in a hurry
        await device.wait_for(lambda: device.count("session.ready") >= 1)
        await until(lambda: len(serving(nodes, "nd-1")) == 1
                    and records.owner("nd-1") == serving(nodes, "nd-1")[0])
        for k in range(2):
            await device.say(f"Question {k}.")
            reply = await device.wait_reply(timeout_s=30)
            assert reply.text.startswith("You said:")
        assert device.count("reply.done") == 2  # no node but the owner answered
        assert len(serving(nodes, "nd-1")) == 1
        await device.send({"type": "session.end"})
        # the conversation is over: its records go
        await until(lambda: records.owners.get("nd-1", "?") is None
                    and not records.conversations.get("nd-1"))
    assert not device.errors, device.errors


async def test_a_draining_node_hands_its_device_and_conversation_to_another(
        broker: Broker) -> None:
    async with two_nodes(broker) as nodes, observer(broker) as records, \
            Device(broker, "nd-2", prefix=PREFIX) as device:
        first = await device.start()
        await device.say("My name is Ada.")
        assert (await device.wait_reply(timeout_s=30)).text == "You said: My name is Ada."
        (old,) = [n for n in nodes if "nd-2" in n.devices]
        (new,) = [n for n in nodes if n is not old]
        await until(lambda: records.conversations.get("nd-2", [])[:1] == [
            ("user", "My name is Ada.")])
        # SIGTERM's drain, in process: no new devices at once, then session.closing
        drained = asyncio.create_task(old.state.drain(1.0))
        await until(lambda: records.nodes.get(old.node_id) == Presence(
            old.node_id, old.fleet.incarnation, draining=True) and not old.shared)
        await device.wait_for(lambda: device.count("session.closing") == 1, 30)
        closing = next(e for e in device.events if e["type"] == "session.closing")
        assert closing["reconnect"] is True and closing["reason"] == "draining"
        assert await drained == 1
        again = await device.start()  # what the speaker client does by itself
        assert again["resumed"] is True and again["session_id"] != first["session_id"]
        assert serving(nodes, "nd-2") == [new.node_id]
        await until(lambda: records.owner("nd-2") == new.node_id)
        await device.say("What is my name?")
        reply = await device.wait_reply(timeout_s=30)
        assert reply.text == "You said: My name is Ada. | What is my name?"
        await device.send({"type": "session.end"})


async def test_devices_can_neither_read_nor_forge_the_nodes_records(broker: Broker) -> None:
    async with two_nodes(broker) as nodes, observer(broker) as records, \
            Device(broker, "nd-3", prefix=PREFIX) as victim, \
            Device(broker, "nd-4", prefix=PREFIX) as intruder:
        await victim.start()
        await victim.say("My secret is 42.")
        await victim.wait_reply(timeout_s=30)
        owner = serving(nodes, "nd-3")[0]
        await until(lambda: bool(records.conversations.get("nd-3")))
        assert intruder.client is not None
        await intruder.client.subscribe(f"{PREFIX}/$cluster/#", qos=1)
        await intruder.client.subscribe(f"{PREFIX}/#", qos=1)
        forged = Claim("n9", "x", "x").encode()
        await intruder.publish(f"{PREFIX}/$cluster/owner/nd-3", forged, 1)
        await intruder.publish(f"{PREFIX}/$cluster/node/{owner}", b"", 1)
        await intruder.publish(f"{PREFIX}/$cluster/state/nd-3", b'{"v": 1, "items": []}', 1)
        # once the intruder's own session is ready, the broker has handled all of that (and
        # sent it the retained records, had it been allowed to read them)
        await intruder.start()
        assert intruder.foreign == []
        await victim.say("What is my secret?")
        reply = await victim.wait_reply(timeout_s=30)
        assert "My secret is 42." in reply.text and serving(nodes, "nd-3") == [owner]
        assert records.owner("nd-3") == owner and records.nodes[owner] is not None
        for device in (victim, intruder):
            await device.send({"type": "session.end"})


# ---- real nodes, the packaged models --------------------------------------------------------


class Fleet:
    """Real ``voxlens serve`` nodes sharing the prefix, started as needed (each loads the
    models); owned by the module."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.nodes: dict[str, ServerProcess] = {}
        self.started = 0

    def _spawn(self, index: int) -> tuple[str, ServerProcess]:
        name = f"node-{index + 1}"
        env = {"VOXLENS_MQTT__URL": self.broker.url(self.broker.node_users[PREFIX][index]),
               "VOXLENS_MQTT__PREFIX": PREFIX, "VOXLENS_MQTT__SHARE_GROUP": GROUP,
               "VOXLENS_MQTT__NODE_ID": name, "VOXLENS_LLM__TEMPERATURE": "0",
               "VOXLENS_VISION__ENGINE": "none", "VOXLENS_SERVER__DRAIN_TIMEOUT_S": "2",
               "VOXLENS_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]'}
        return name, spawn_server(ARTIFACTS / f"server-mqtt-{name}.log", env=env)

    def ensure(self, count: int) -> None:
        """At least ``count`` nodes alive (new ones start side by side)."""
        self.nodes = {n: p for n, p in self.nodes.items() if p.proc.poll() is None}
        missing = count - len(self.nodes)
        if missing <= 0:
            return
        indexes = range(self.started, self.started + missing)
        self.started += missing
        assert self.started < len(self.broker.node_users[PREFIX])  # the last user observes
        with ThreadPoolExecutor(missing) as pool:
            self.nodes.update(pool.map(self._spawn, indexes))

    def devices(self, name: str) -> int:
        count: int = health(self.nodes[name])["mqtt"]["devices"]
        return count

    def stop(self) -> None:
        for p in self.nodes.values():
            if p.proc.poll() is None:
                p.stop()


@pytest.fixture(scope="module")
def fleet(broker: Broker) -> Iterator[Fleet]:
    f = Fleet(broker)
    try:
        yield f
    finally:
        f.stop()


async def test_ten_devices_one_node_each_and_a_killed_nodes_devices_go_on_elsewhere(
        fleet: Fleet, broker: Broker) -> None:
    """Ten devices, two nodes: each device is served by exactly one node. SIGKILL one node: its
    devices are told to start again, the other node takes them, and their next turn knows the
    earlier conversation (carried on the broker); the other node's devices notice nothing."""
    await asyncio.to_thread(fleet.ensure, 2)
    ids = [f"nd-{k}" for k in range(5, 15)]
    async with contextlib.AsyncExitStack() as stack:
        records = await stack.enter_async_context(observer(broker))
        devices = [await stack.enter_async_context(Device(broker, d, prefix=PREFIX))
                   for d in ids]
        first = await asyncio.gather(*(d.start(language="en") for d in devices))
        await asyncio.gather(*(d.say(f"My name is {name}. Please remember my name.")
                               for d, name in zip(devices, NAMES, strict=True)))
        await asyncio.gather(*(d.wait_reply(timeout_s=240) for d in devices))
        await until(lambda: all(records.owner(d) in fleet.nodes for d in ids), timeout_s=30)
        owners = {d: records.owner(d) for d in ids}
        counts = {name: fleet.devices(name) for name in fleet.nodes}
        assert sum(counts.values()) == 10 and all(counts.values()), counts
        assert counts == {n: sum(o == n for o in owners.values()) for n in counts}
        assert all(d.count("session.ready") == 1 and d.count("reply.done") == 1
                   for d in devices)

        # every conversation is on the broker; then one node dies without a word
        await until(lambda: all(records.conversations.get(d, [])[:1] == [
            ("user", f"My name is {name}. Please remember my name.")]
            for d, name in zip(ids, NAMES, strict=True)), timeout_s=30)
        killed, survivor = sorted(fleet.nodes)
        fleet.nodes[killed].proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(fleet.nodes[killed].proc.wait, 30)
        await until(lambda: records.nodes.get(killed, "?") is None, timeout_s=30)  # its Will
        moved = [k for k, d in enumerate(ids) if owners[d] == killed]
        stayed = [k for k, d in enumerate(ids) if owners[d] == survivor]
        for k in moved:  # told to start again (what voxlens speaker does by itself)
            await devices[k].wait_for(partial(told_to_start_again, devices[k]), timeout_s=30)
        again = await asyncio.gather(*(devices[k].start(language="en") for k in moved))
        assert all(r["resumed"] is True for r in again)
        assert all(r["session_id"] != first[k]["session_id"]
                   for r, k in zip(again, moved, strict=True))
        await asyncio.gather(*(devices[k].say("What is my name?") for k in moved))
        replies = await asyncio.gather(*(devices[k].wait_reply(timeout_s=240) for k in moved))
        await until(lambda: all(records.owner(d) == survivor for d in ids), timeout_s=30)
        assert fleet.devices(survivor) == 10
        # the survivor's session holds the whole conversation, and the answer knows it
        for k in moved:
            carried = records.conversations[ids[k]]
            assert carried[0] == ("user", f"My name is {NAMES[k]}. Please remember my name.")
            assert ("user", "What is my name?") in carried[2:], carried
        heard = {NAMES[k]: r.text for k, r in zip(moved, replies, strict=True)}
        assert all(name.lower() in text.lower() for name, text in heard.items()), heard
        for k in stayed:  # nothing happened to them
            assert devices[k].count("session.ready") == 1 and not devices[k].errors
        for d in devices:
            await d.send({"type": "session.end"})
    assert all(e["code"] in ("no_session", "busy") for d in devices for e in d.errors)


def told_to_start_again(device: Device) -> bool:
    return any(e["code"] == "no_session" for e in device.errors)


def two_questions(voice, path: Path, gap_s: float) -> Path:  # type: ignore[no-untyped-def]
    """A WAV: a name, a long pause (when the node drains), then the question about it."""
    name, rate = speak(voice, "My name is Oscar.")
    question, _ = speak(voice, "What is my name?")
    silence = np.zeros(int(rate * gap_s), dtype=np.float32)
    write_wav(path, np.concatenate([silence[:rate // 2], name, silence, question]), rate)
    return path


async def test_the_speaker_leaves_a_draining_node_by_itself_with_its_conversation(  # type: ignore[no-untyped-def]
        fleet: Fleet, broker: Broker, voice, tmp_path: Path) -> None:
    """``voxlens speaker`` on a node that gets SIGTERM: the node takes no new devices, closes
    the speaker's session with ``session.closing`` after its drain timeout and exits 0; the
    speaker starts again by itself, on the other node, which goes on with the conversation."""
    await asyncio.to_thread(fleet.ensure, 2)
    wav = two_questions(voice, tmp_path / "two-questions.wav", gap_s=20.0)
    out = io.StringIO()
    link = MqttLink(broker.url("nd-speaker"), "nd-speaker", prefix=PREFIX)
    speaker = Speaker(link, FileAudio(wav, tmp_path / "reply.wav", 16000, 24000),
                      SpeakerOptions(language="en", json_events=True, timeout_s=240), out=out)

    def events(kind: str) -> list[dict[str, Any]]:
        return [e for e in map(json.loads, out.getvalue().splitlines()) if e["type"] == kind]

    async with observer(broker) as records, asyncio.TaskGroup() as tg:
        run = tg.create_task(speaker.run())
        await until(lambda: len(events("reply.done")) == 1, timeout_s=120)
        draining = records.owner("nd-speaker")
        assert draining in fleet.nodes
        (other,) = [n for n in fleet.nodes if n != draining]
        await until(lambda: bool(records.conversations.get("nd-speaker")), timeout_s=30)
        fleet.nodes[draining].proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(fleet.nodes[draining].proc.wait, 60)
    assert run.result() == 0 and code == 0
    closing = events("session.closing")
    assert len(closing) == 1 and closing[0]["reconnect"] is True
    # the first session, then the other node's (a start it was slow to answer went again, and
    # each answer is a session.ready of the same resumed session)
    first, *again = events("session.ready")
    assert again and {(e["session_id"], e["resumed"]) for e in again} == {
        (again[0]["session_id"], True)}, (first, again, closing, events("error"))
    assert again[0]["session_id"] != first["session_id"]
    assert records.owner("nd-speaker") == other
    said = [e["text"] for e in events("transcript") if e["final"]]
    assert len(said) == 2 and "oscar" in said[0].lower(), said
    replies = [e["text"] for e in events("reply.done")]
    assert len(replies) == 2 and "oscar" in replies[1].lower(), replies
    assert ("user", said[0]) in records.conversations["nd-speaker"]
    log = fleet.nodes[draining].log.read_text("utf-8")
    assert "is draining: it takes no more devices" in log
