"""The [mqtt] settings: the documented short environment names, the nested ones, TOML, checks."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("VOXLENS_"):
            monkeypatch.delenv(key)


def test_mqtt_is_off_by_default() -> None:
    s = load_settings()
    assert s.mqtt.url is None and s.mqtt.prefix == "voxlens" and s.mqtt.idle_timeout_s == 300


def test_short_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXLENS_MQTT_URL", "mqtt://dev:secret@127.0.0.1:1883")
    monkeypatch.setenv("VOXLENS_MQTT_PREFIX", "home/voxlens")
    s = load_settings()
    assert (s.mqtt.url, s.mqtt.prefix) == ("mqtt://dev:secret@127.0.0.1:1883", "home/voxlens")


def test_nested_env_beats_short_names_which_beat_toml(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "voxlens.toml"
    cfg.write_text('[mqtt]\nurl = "mqtts://broker.example:8883"\nprefix = "from/toml"\n'
                   'ca_file = "/etc/ssl/ca.pem"\nidle_timeout_s = 30\n')
    s = load_settings(cfg)
    assert (s.mqtt.url, s.mqtt.prefix, s.mqtt.idle_timeout_s) == (
        "mqtts://broker.example:8883", "from/toml", 30)
    assert s.mqtt.ca_file == Path("/etc/ssl/ca.pem")
    monkeypatch.setenv("VOXLENS_MQTT_PREFIX", "from/short")
    assert load_settings(cfg).mqtt.prefix == "from/short"
    monkeypatch.setenv("VOXLENS_MQTT__PREFIX", "from/nested")
    assert load_settings(cfg).mqtt.prefix == "from/nested"
    assert load_settings(cfg).mqtt.url == "mqtts://broker.example:8883"


@pytest.mark.parametrize(("env", "value", "fragment"), [
    ("VOXLENS_MQTT_URL", "http://127.0.0.1:1883", "mqtt://"),
    ("VOXLENS_MQTT_URL", "mqtt://", "mqtt://"),
    ("VOXLENS_MQTT_PREFIX", "vx/+", "prefix"),
    ("VOXLENS_MQTT_PREFIX", "/vx", "prefix"),
    ("VOXLENS_MQTT__IDLE_TIMEOUT_S", "0", "idle_timeout_s"),
])
def test_bad_mqtt_settings_are_refused(monkeypatch: pytest.MonkeyPatch, env: str, value: str,
                                       fragment: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError, match=fragment):
        load_settings()


def test_several_nodes_settings_are_checked() -> None:
    settings = load_settings(mqtt={"url": "mqtt://127.0.0.1", "share_group": "g1",
                                   "node_id": "kitchen-node.1"})
    assert (settings.mqtt.share_group, settings.mqtt.node_id) == ("g1", "kitchen-node.1")
    assert settings.mqtt.history_on_broker is True
    assert load_settings().mqtt.share_group is None  # one node, as before
    for bad in ({"share_group": "a/b"}, {"share_group": ""}, {"node_id": "$n"},
                {"node_id": "a b"}):
        with pytest.raises(ValueError, match=r"share group|node id"):
            load_settings(mqtt={"url": "mqtt://127.0.0.1", **bad})
