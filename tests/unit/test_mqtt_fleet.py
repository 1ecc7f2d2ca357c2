"""Several nodes on one broker, as plain values: the records the nodes exchange, and one node's
decisions (``streaming.mqtt_fleet.Fleet``): where each device message goes, who yields when two nodes
claim one device, what a node reconciles after rejoining, which devices of a dead node it tells
to start again, and which records it clears."""

from __future__ import annotations

import itertools
import json
import random
from collections import deque

import pytest

from streaming.mqtt import AUDIO_IN, CONTROL
from streaming.mqtt_fleet import Fleet, Route, Verdict
from streaming.mqtt_records import (
    MAX_SNAPSHOT_BYTES,
    Claim,
    HistoryItems,
    Presence,
    cluster_filters,
    cluster_topic,
    decode_history,
    encode_history,
    parse_cluster_topic,
    shared_filter,
)

START = lambda: True  # noqa: E731 (a session.start)
OTHER = lambda: False  # noqa: E731 (any other control message)


def joined(node: str, *others: Fleet, now: float = 100.0) -> Fleet:
    """A node past its join, seeing itself and ``others`` up, settled."""
    fleet = Fleet(node, incarnation=f"{node}-1")
    for f in (fleet, *others):
        fleet.on_presence(f.node, f.presence())
    fleet.rejoined(now - 10)
    return fleet


def test_records_round_trip_and_malformed_ones_are_refused() -> None:
    assert Presence.decode(Presence("n1", "i1", True).encode()) == Presence("n1", "i1", True)
    claim = Claim("n1", "i1", "t1", epoch=7, serving=False)
    assert Claim.decode(claim.encode()) == claim
    assert Presence.decode(b"") is None and Claim.decode(b"") is None  # cleared
    for bad in (b"{", b"[]", b'{"node": "n1"}', b'{"node": "a/b", "incarnation": "i", '
                b'"draining": false}', b'{"node": 1, "incarnation": "i", "draining": false}',
                b"\xff"):
        with pytest.raises(ValueError):
            Presence.decode(bad)
    for bad in (b'{"node": "n1", "incarnation": "i", "token": "t", "epoch": 1, "serving": 1}',
                b'{"node": "n1", "incarnation": "i", "token": "t", "epoch": -1, "serving": true}',
                b'{"node": "n1", "incarnation": "i", "token": "t", "serving": true}'):
        with pytest.raises(ValueError):
            Claim.decode(bad)


def test_cluster_topics_are_apart_from_device_topics() -> None:
    assert cluster_topic("home/vx", "owner", "kitchen") == "home/vx/$cluster/owner/kitchen"
    assert parse_cluster_topic("home/vx", "home/vx/$cluster/state/kitchen") == ("state", "kitchen")
    for name in ("home/vx/kitchen/control", "home/vx/$cluster/owner", "home/vx/$cluster/x/k",
                 "home/vx/$cluster/owner/a/b", "other/$cluster/owner/k"):
        assert parse_cluster_topic("home/vx", name) is None
    assert shared_filter("home/vx", "g1") == "$share/g1/home/vx/+/control"
    # a node hears presence, owners and its own barrier, never every conversation
    assert cluster_filters("vx", "n1") == ["vx/$cluster/node/+", "vx/$cluster/owner/+",
                                           "vx/$cluster/sync/n1"]


def test_a_carried_conversation_fits_its_bound_and_starts_with_a_question() -> None:
    items: HistoryItems = [("user", "My name is Ada."), ("assistant", "Hello Ada!")] * 3
    assert decode_history(encode_history(items)) == items
    assert decode_history(b"") == []
    long: HistoryItems = [("user", "q" * 1000), ("assistant", "a" * 1000)] * 100
    payload = encode_history(long)
    assert len(payload) <= MAX_SNAPSHOT_BYTES
    kept = decode_history(payload)
    assert kept == long[-len(kept):] and kept[0][0] == "user" and len(kept) < len(long)
    assert decode_history(encode_history([("assistant", "orphan answer"), ("user", "hi")])) == [
        ("user", "hi")]
    assert json.loads(encode_history([("user", "你好")]))["items"] == [["user", "你好"]]
    for bad in (b'{"v": 1, "items": [["call", "x"]]}', b'{"v": 1, "items": [["user"]]}',
                b'{"v": 1, "items": "x"}', b"x" * (MAX_SNAPSHOT_BYTES + 1)):
        with pytest.raises(ValueError):
            decode_history(bad)


def test_nothing_is_decided_before_the_node_has_read_the_brokers_records() -> None:
    fleet = Fleet("n1")
    fleet.local.add("kitchen")
    for shared in (True, False):
        assert fleet.route("kitchen", CONTROL, shared=shared, is_start=START,
                           now=0) is Route.IGNORE
        assert fleet.route("car", CONTROL, shared=shared, is_start=START, now=0) is Route.IGNORE


def test_a_new_device_is_taken_by_the_node_its_start_reaches_once_settled() -> None:
    fleet = Fleet("n1", settle_s=3.0)
    fleet.rejoined(now=100.0)
    # just joined: a device nobody claims may belong to a node that is reconnecting
    assert fleet.route("car", CONTROL, shared=True, is_start=START, now=101) is Route.IGNORE
    assert fleet.route("car", CONTROL, shared=True, is_start=START, now=103) is Route.TAKE
    # without a session anywhere, anything else is answered (no_session), as one node does
    assert fleet.route("car", CONTROL, shared=True, is_start=OTHER, now=101) is Route.ANSWER
    # audio comes only through a served device's own subscription
    assert fleet.route("car", AUDIO_IN, shared=False, is_start=OTHER, now=103) is Route.IGNORE


def test_a_served_device_is_handled_through_its_own_subscription_only() -> None:
    fleet = joined("n1")
    claim = fleet.claim("kitchen")
    assert fleet.on_claim("kitchen", claim) is Verdict.KEEP  # ours, back from the broker
    for kind in (CONTROL, AUDIO_IN):
        assert fleet.route("kitchen", kind, shared=False, is_start=START,
                           now=100) is Route.HANDLE
    # the shared copy of the same control message is left alone
    assert fleet.route("kitchen", CONTROL, shared=True, is_start=START, now=100) is Route.IGNORE


def test_what_another_live_node_serves_is_left_alone_unless_it_drains() -> None:
    n2 = Fleet("n2", incarnation="n2-1")
    fleet = joined("n1", n2)
    fleet.on_claim("kitchen", Claim("n2", "n2-1", "t"))
    for is_start in (START, OTHER):
        assert fleet.route("kitchen", CONTROL, shared=True, is_start=is_start,
                           now=100) is Route.IGNORE
    fleet.on_presence("n2", Presence("n2", "n2-1", draining=True))
    # a draining node still serves its device until it closes it; a new start moves it
    assert fleet.route("kitchen", CONTROL, shared=True, is_start=OTHER, now=100) is Route.IGNORE
    assert fleet.route("kitchen", CONTROL, shared=True, is_start=START, now=100) is Route.TAKE


@pytest.mark.parametrize("owner", [
    Claim("n2", "n2-1", "t"),  # its node died (its Last Will cleared its presence)
    Claim("n2", "n2-0", "t"),  # claimed by an earlier life of a node that restarted
    Claim("n3", "n3-1", "t", serving=False),  # released by a live node (drained, failed)
])
def test_a_device_whose_owner_is_gone_or_let_it_go_is_taken_by_its_next_start(
        owner: Claim) -> None:
    fleet = joined("n1", Fleet("n3", incarnation="n3-1"))
    fleet.on_presence("n2", Presence("n2", "n2-1"))
    fleet.on_presence("n2", None if owner.incarnation == "n2-1" else Presence("n2", "n2-1"))
    fleet.on_claim("kitchen", owner)
    assert fleet.holder("kitchen") is None
    assert fleet.route("kitchen", CONTROL, shared=True, is_start=START, now=100) is Route.TAKE
    assert fleet.route("kitchen", CONTROL, shared=True, is_start=OTHER, now=100) is Route.ANSWER


def test_a_draining_node_lets_a_served_device_go_when_it_starts_again() -> None:
    fleet = joined("n1")
    fleet.on_claim("kitchen", fleet.claim("kitchen"))
    fleet.draining = True
    assert fleet.presence().draining
    assert fleet.route("kitchen", CONTROL, shared=False, is_start=START, now=100) is Route.IGNORE
    assert fleet.route("kitchen", CONTROL, shared=False, is_start=OTHER, now=100) is Route.HANDLE
    assert fleet.route("kitchen", AUDIO_IN, shared=False, is_start=OTHER, now=100) is Route.HANDLE


def racing(nodes: int) -> list[Fleet]:
    fleets = [Fleet(f"n{k}", incarnation=f"i{k}") for k in range(nodes)]
    for f in fleets:
        for other in fleets:
            f.on_presence(other.node, other.presence())
        f.rejoined(0.0)
    return fleets


@pytest.mark.parametrize("nodes", [2, 3])
def test_claims_made_at_once_leave_one_node_and_the_record_names_it(nodes: int) -> None:
    """Every node claims the device before it hears anyone else's claim. One broker: every
    node hears every record in the order the broker took it, its own included, and what
    nodes publish in answer (the yielder puts the winning claim back, a winner that hears an
    outranked claim after its own puts its own back) joins that order. Whatever the order,
    exactly one node serves the device, every node agrees which, and the record the broker
    keeps (the last) names it."""
    for order in itertools.permutations(range(nodes)):
        fleets = racing(nodes)
        claims = [f.claim("kitchen") for f in fleets]
        winner = max(claims, key=lambda c: c.rank)
        broker = deque(claims[k] for k in order)
        kept: list[Claim] = []
        while broker:
            record = broker.popleft()
            kept.append(record)
            assert len(kept) < 50
            for f in fleets:
                held = f.own.get("kitchen")
                match f.on_claim("kitchen", record):
                    case Verdict.YIELD:
                        broker.append(record)
                    case Verdict.REASSERT:
                        assert held is not None
                        broker.append(held)
                    case Verdict.RECLAIM:
                        broker.append(f.claim("kitchen"))
        assert [f.node for f in fleets if "kitchen" in f.local] == [winner.node], order
        assert kept[-1] == winner
        assert all(f.claims["kitchen"] == winner for f in fleets)


def test_claims_heard_in_different_orders_still_leave_one_node() -> None:
    """A clustered broker may hand claims to each node in another order: the nodes still agree
    (the best-ranked claim wins), so a device is never left with no node, or two."""
    rng = random.Random(5)
    for _ in range(200):
        fleets = racing(rng.randint(2, 4))
        claims = [f.claim("kitchen") for f in fleets]
        for f in fleets:
            for claim in rng.sample(claims, len(claims)):
                f.on_claim("kitchen", claim)
        winner = max(claims, key=lambda c: c.rank)
        assert [f.node for f in fleets if "kitchen" in f.local] == [winner.node]
        assert all(f.claims["kitchen"] == winner for f in fleets)


def test_outranked_claims_change_nothing_and_a_better_one_wins() -> None:
    fleet = joined("n1")
    mine = fleet.claim("kitchen")
    assert mine.epoch == 1
    late = Claim("n2", "n2-1", "x", epoch=0)
    assert fleet.on_claim("kitchen", late) is Verdict.REASSERT  # it may be what the broker kept
    assert fleet.on_claim("kitchen", mine) is Verdict.KEEP
    assert fleet.on_claim("kitchen", mine) is Verdict.KEEP  # a repeat changes nothing
    assert fleet.on_claim("kitchen", late) is Verdict.REASSERT
    newer = Claim("n2", "n2-1", "y", epoch=2)  # a take-over: above every claim it had seen
    assert fleet.on_claim("kitchen", newer) is Verdict.YIELD
    assert "kitchen" not in fleet.local and fleet.claims["kitchen"] == newer
    assert fleet.claim("kitchen").epoch == 3  # taking it back outranks it in turn
    # a release outranks the claim it releases, and nothing else
    assert mine.released().rank > mine.rank and mine.released().rank < newer.rank
    # a record cleared under a device the node serves is claimed again
    fleet.on_claim("car", fleet.claim("car"))
    assert fleet.on_claim("car", None) is Verdict.RECLAIM


def test_rejoining_reconciles_what_the_node_serves_with_what_the_broker_kept() -> None:
    fleet = joined("n1")
    own = {d: fleet.claim(d) for d in ("kept", "lost", "taken", "below")}
    for device, claim in own.items():
        fleet.on_claim(device, claim)
    gone = fleet.claim("gone")  # served no more here, but the broker still says it is
    fleet.on_claim("gone", gone)
    fleet.forget("gone")
    fleet.disconnected()
    assert not fleet.synced and not fleet.nodes and not fleet.claims
    # what the broker kept: "lost" vanished (a broker restart), "taken" went to another node,
    # "below" is an outranked claim the broker took after ours
    fleet.on_presence("n1", fleet.presence())
    for device in ("kept", "gone"):
        fleet.on_claim(device, own.get(device, gone))
    fleet.on_claim("taken", Claim("n2", "n2-1", "t", epoch=5))
    fleet.on_claim("below", Claim("n2", "n2-1", "t", epoch=0))
    rejoin = fleet.rejoined(200.0)
    assert rejoin.reclaim == ["below", "lost"]
    assert rejoin.yielded == ["taken"]
    assert rejoin.release == ["gone"]
    assert fleet.local == {"kept", "lost", "below"}
    assert fleet.release("gone") == gone.released()
    assert fleet.claim("lost").epoch == own["lost"].epoch + 1


def test_the_devices_of_a_dead_node_are_told_once_by_one_node_and_forgotten_later() -> None:
    fleets = [Fleet(f"n{k}", incarnation=f"i{k}", orphan_grace_s=1.0) for k in range(4)]
    for f in fleets:
        for other in fleets:
            f.on_presence(other.node, other.presence())
        f.rejoined(0.0)
    devices = [f"dev-{k}" for k in range(40)]
    for f in fleets:
        for d in devices:
            f.on_claim(d, Claim("n3", "i3", f"t-{d}"))
    survivors = fleets[:3]
    for f in survivors:
        f.on_presence("n3", None)  # n3's Last Will
        assert f.sweep(now=10.0, forget_after_s=300) == ([], [])  # not yet: it may be back
    told = [f.sweep(now=11.5, forget_after_s=300)[0] for f in survivors]
    assert sorted(d for t in told for d in t) == sorted(devices)  # each device by one node
    assert all(t for t in told)  # spread over the nodes (rendezvous hashing)
    assert all(f.chooser(d) == survivors[0].chooser(d) for f in survivors for d in devices)
    assert [f.sweep(now=12.0, forget_after_s=300)[0] for f in survivors] == [[], [], []]
    forgotten = [f.sweep(now=311.0, forget_after_s=300)[1] for f in survivors]
    assert sorted(d for t in forgotten for d in t) == sorted(devices)
    assert [f.sweep(now=400.0, forget_after_s=300) for f in survivors] == [([], [])] * 3


def test_a_released_device_is_not_told_but_forgotten_and_draining_nodes_choose_nothing() -> None:
    n2 = Fleet("n2", incarnation="i2")
    fleet = joined("n1", n2, now=0.0)
    fleet.on_claim("kitchen", Claim("n2", "i2", "t", serving=False))
    assert fleet.sweep(now=5.0, forget_after_s=10) == ([], [])
    fleet.on_presence("n1", Presence("n1", fleet.incarnation, draining=True))
    assert fleet.chooser("kitchen") == "n2"
    assert fleet.sweep(now=50.0, forget_after_s=10) == ([], [])  # n2 looks after it
    fleet.on_presence("n2", None)
    assert fleet.chooser("kitchen") is None
