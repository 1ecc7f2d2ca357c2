"""aiomqtt's waits for the broker, cancelled just as the broker answers, stay cancelled
(streaming/mqtt_calls.py: on Python 3.11 aiomqtt's own ``wait_for`` returned instead)."""

from __future__ import annotations

import asyncio

import aiomqtt
import paho.mqtt.client as mqtt
import pytest

from streaming.mqtt_calls import publish

MID = 7


def _client_waiting_for_the_broker(monkeypatch: pytest.MonkeyPatch) -> aiomqtt.Client:
    """A real aiomqtt client whose paho publish queues message MID and returns (no broker: the
    broker's answer is paho's callback, called by the test)."""
    client = aiomqtt.Client("127.0.0.1")
    info = mqtt.MQTTMessageInfo(MID)
    info.rc = mqtt.MQTT_ERR_SUCCESS
    monkeypatch.setattr(client._client, "publish", lambda *args, **kwargs: info)
    return client


async def test_a_publish_cancelled_as_the_broker_answers_is_cancelled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client_waiting_for_the_broker(monkeypatch)
    task = asyncio.create_task(publish(client, "voxlens/dev/audio/in", b"pcm", qos=1))
    await asyncio.sleep(0)  # it waits for the broker's answer
    client._on_publish(client._client, None, MID, None, None)  # type: ignore[arg-type]
    task.cancel()  # in the same turn of the loop as the answer
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_publish_the_broker_never_answers_is_an_mqtt_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client_waiting_for_the_broker(monkeypatch)
    with pytest.raises(aiomqtt.MqttError, match="no answer from the broker"):
        await publish(client, "voxlens/dev/audio/in", b"pcm", qos=1, timeout_s=0.05)


async def test_a_publish_the_broker_answers_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client_waiting_for_the_broker(monkeypatch)
    task = asyncio.create_task(publish(client, "voxlens/dev/audio/in", b"pcm", qos=1))
    await asyncio.sleep(0)
    client._on_publish(client._client, None, MID, None, None)  # type: ignore[arg-type]
    await task
    assert task.done() and task.exception() is None
