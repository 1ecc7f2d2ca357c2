"""The records several voxlens nodes keep on one MQTT broker (docs/ARCHITECTURE.md, "MQTT
across nodes"), under ``<prefix>/$cluster/…``: each node's presence (retained, with a Last Will
that clears it), each device's owner record (who serves it) and its carried conversation; their
topics, filters and encodings. Every decision made from them is ``Fleet``'s
(streaming/mqtt_fleet.py). Records from the broker are never trusted to be well formed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from streaming.mqtt import AUDIO_IN, CONTROL, DEVICE_ID, QOS, topic

CLUSTER: Final = "$cluster"  # <prefix>/$cluster/…: no device id starts with '$'
ClusterKind = Literal["node", "owner", "state", "sync"]
CLUSTER_KINDS: Final = ("node", "owner", "state", "sync")
# MQTT 5 subscription identifiers: which of a node's subscriptions brought a message
SHARED, DIRECT, CLUSTER_SUB, STATE_SUB = 1, 2, 3, 4
MAX_SNAPSHOT_BYTES = 64 * 1024  # a conversation carried on the broker (trimmed, oldest first)
MAX_SNAPSHOT_ITEMS = 512
SHARE_GROUP = re.compile(r"[A-Za-z0-9_.@-]{1,64}")  # no '/', '+', '#' (MQTT 5), ':' (HiveMQ)


def valid_node_id(node_id: str) -> bool:
    """A node id is a topic level, like a device id."""
    return DEVICE_ID.fullmatch(node_id) is not None


def check_share_group(group: str) -> str:
    if SHARE_GROUP.fullmatch(group) is None:
        raise ValueError(f"invalid MQTT share group {group!r}: 1–64 letters, digits and _ . @ -")
    return group


def cluster_topic(prefix: str, kind: ClusterKind, name: str) -> str:
    """``<prefix>/$cluster/node/<node>`` (presence), ``…/owner/<device>`` (who serves it),
    ``…/state/<device>`` (its conversation), ``…/sync/<node>`` (a node's barrier)."""
    return f"{prefix}/{CLUSTER}/{kind}/{name}"


def parse_cluster_topic(prefix: str, name: str) -> tuple[ClusterKind, str] | None:
    head = f"{prefix}/{CLUSTER}/"
    if not name.startswith(head):
        return None
    kind, _, rest = name[len(head):].partition("/")
    for known in CLUSTER_KINDS:
        if kind == known and rest and "/" not in rest:
            return known, rest
    return None


def shared_filter(prefix: str, group: str) -> str:
    """Where a node hears the control messages of devices it does not serve (one node of the
    group gets each message)."""
    return f"$share/{group}/{prefix}/+/{CONTROL}"


def cluster_filters(prefix: str, node: str) -> list[str]:
    """Presence and owner records of every node and device, and this node's own barrier (the
    conversations stay out: a node reads one only when it takes a device over)."""
    return [cluster_topic(prefix, "node", "+"), cluster_topic(prefix, "owner", "+"),
            cluster_topic(prefix, "sync", node)]


def device_filters(prefix: str, device_id: str) -> list[tuple[str, int]]:
    """A served device's own topics, subscribed by the node that serves it."""
    return [(topic(prefix, device_id, CONTROL), QOS[CONTROL]),
            (topic(prefix, device_id, AUDIO_IN), QOS[AUDIO_IN])]


def _record(payload: bytes, fields: dict[str, type]) -> dict[str, Any]:
    """A JSON object with these fields of these types (a node's record: checked all the same)."""
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError("not JSON") from e
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    for name, kind in fields.items():
        if not isinstance(obj.get(name), kind):
            raise ValueError(f"field {name!r} missing or not {kind.__name__}")
    return obj


@dataclass(frozen=True, slots=True)
class Presence:
    """A live node (retained on ``node/<id>``; its Last Will, an empty payload, clears it).
    ``incarnation`` is new with every process, so a restarted node is a new one."""

    node: str
    incarnation: str
    draining: bool = False

    def encode(self) -> bytes:
        return json.dumps({"node": self.node, "incarnation": self.incarnation,
                           "draining": self.draining}).encode()

    @staticmethod
    def decode(payload: bytes) -> Presence | None:
        """None for an empty payload (the node is gone); ValueError for anything malformed."""
        if not payload:
            return None
        o = _record(payload, {"node": str, "incarnation": str, "draining": bool})
        if not valid_node_id(o["node"]):
            raise ValueError("invalid node id")
        return Presence(o["node"], o["incarnation"][:64], o["draining"])


@dataclass(frozen=True, slots=True)
class Claim:
    """Who has a device (retained on ``owner/<device>``): ``serving`` while the node holds its
    session; a released claim (the session ended for a drain or a failure) is free to take and
    its conversation stays on the broker.

    Claims are ordered (``rank``): a node claims with an ``epoch`` above every claim it has seen
    for the device, ``token`` (random) breaks ties between claims made at once, and a release
    comes right after the claim it releases. Every node that has seen the same claims agrees
    on the best one, whatever order they came in."""

    node: str
    incarnation: str
    token: str
    epoch: int = 1
    serving: bool = True

    @property
    def rank(self) -> tuple[int, str, bool]:
        return self.epoch, self.token, not self.serving

    def released(self) -> Claim:
        return replace(self, serving=False)

    def encode(self) -> bytes:
        return json.dumps({"node": self.node, "incarnation": self.incarnation,
                           "token": self.token, "epoch": self.epoch,
                           "serving": self.serving}).encode()

    @staticmethod
    def decode(payload: bytes) -> Claim | None:
        """None for an empty payload (nobody has the device); ValueError if malformed."""
        if not payload:
            return None
        o = _record(payload, {"node": str, "incarnation": str, "token": str, "epoch": int,
                              "serving": bool})
        if not valid_node_id(o["node"]) or isinstance(o["epoch"], bool) or o["epoch"] < 0:
            raise ValueError("invalid node id or epoch")
        return Claim(o["node"], o["incarnation"][:64], o["token"][:64], o["epoch"], o["serving"])


HistoryKind = Literal["user", "assistant"]
HistoryItems = list[tuple[HistoryKind, str]]


def encode_history(items: Sequence[tuple[HistoryKind, str]],
                   limit: int = MAX_SNAPSHOT_BYTES) -> bytes:
    """A conversation as words (``state/<device>``): the oldest items are left out until it fits
    ``limit``, and it never starts with an answer whose question was left out."""
    kept = list(items)[-MAX_SNAPSHOT_ITEMS:]
    while True:
        while kept and kept[0][0] != "user":
            kept.pop(0)
        payload = json.dumps({"v": 1, "items": [[k, t] for k, t in kept]},
                             ensure_ascii=False).encode()
        if len(payload) <= limit or not kept:
            return payload
        kept.pop(0)


def decode_history(payload: bytes) -> HistoryItems:
    """The items of a carried conversation ([] for none); ValueError if malformed."""
    if not payload:
        return []
    if len(payload) > MAX_SNAPSHOT_BYTES:
        raise ValueError("conversation record too large")
    o = _record(payload, {"v": int, "items": list})
    items: HistoryItems = []
    for item in o["items"][:MAX_SNAPSHOT_ITEMS]:
        if (not isinstance(item, list) or len(item) != 2 or item[0] not in ("user", "assistant")
                or not isinstance(item[1], str)):
            raise ValueError("malformed conversation item")
        items.append((item[0], item[1]))
    return items


