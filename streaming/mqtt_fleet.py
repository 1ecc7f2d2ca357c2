"""Several voxlens nodes on one MQTT broker (docs/ARCHITECTURE.md, "MQTT across nodes"):
every ownership decision (``Fleet``), made from the nodes' records on the broker
(streaming/mqtt_records.py). Pure logic: no broker, no loop; the bridge (server/mqtt.py) feeds
it and acts on it.

A device's session.start reaches one node through an MQTT 5 shared subscription; that node
claims the device (a retained owner record) and subscribes the device's own topics; every node
knows every live node (retained presence, with a Last Will that clears it) and every owner
record, so it knows what to do with what reaches it. Between nodes: ``<prefix>/$cluster/…``.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from streaming.mqtt import CONTROL, Kind
from streaming.mqtt_records import Claim, Presence

ORPHAN_GRACE_S = 1.0  # an owner gone this long (not just reconnecting): its devices are told
SETTLE_S = 3.0  # after (re)joining, a device nobody claims waits this long for its old node
MAX_CLAIMS = 100_000  # owner records remembered (every device of the prefix)
MAX_NODES = 1024


class Route(enum.Enum):
    """What a node does with a device's message."""

    HANDLE = "handle"  # to the device's session here
    IGNORE = "ignore"  # another node serves the device, or it is the shared copy of one we have
    TAKE = "take"  # a session.start: this node claims the device and opens its session
    ANSWER = "answer"  # nobody serves the device: answered as one node answers a stranger


class Verdict(enum.Enum):
    """What a node does when a device's owner record changes."""

    KEEP = "keep"
    # another node's claim outranks ours: stop serving the device, silently, and put that claim
    # back (our own, published before, must not be the record the broker keeps)
    YIELD = "yield"
    # an outranked claim came after ours (the broker may keep it as the record): put ours back
    REASSERT = "reassert"
    RECLAIM = "reclaim"  # our device's record was cleared while we serve it: claim it again


@dataclass(frozen=True, slots=True)
class Rejoin:
    """After (re)joining the broker: what to claim again, give up and release."""

    reclaim: list[str]  # served here; no record (a broker restart), or one below our claim
    yielded: list[str]  # served here, but another node claimed them while we were away
    release: list[str]  # claimed by this very process, but no longer served here


@dataclass(slots=True)
class _Orphan:
    since: float  # when this node saw the device's owner gone (or its claim released)
    token: str
    prompted: bool = False
    forgotten: bool = False


@dataclass
class Fleet:
    """One node's view of the nodes of its share group, and its decisions about devices.

    Fed with the cluster topics' records (``on_presence``, ``on_claim``) and a monotonic clock;
    it decides where each device message goes (``route``), when to give a device up
    (``on_claim``: the best-ranked claim wins, in whatever order claims arrive), which devices
    of a dead node this node tells to start again and which forgotten records it clears
    (``sweep``). ``local`` is every device this node holds (served, or being taken over), with
    its claim in ``own``.
    """

    node: str
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    orphan_grace_s: float = ORPHAN_GRACE_S
    settle_s: float = SETTLE_S
    max_claims: int = MAX_CLAIMS
    nodes: dict[str, Presence] = field(default_factory=dict)
    claims: dict[str, Claim] = field(default_factory=dict)
    local: set[str] = field(default_factory=set)
    draining: bool = False
    own: dict[str, Claim] = field(default_factory=dict)  # device held here → our claim
    _orphans: dict[str, _Orphan] = field(default_factory=dict)
    _synced_at: float | None = None

    # ---- the connection -----------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._synced_at is not None

    def presence(self) -> Presence:
        return Presence(self.node, self.incarnation, self.draining)

    def disconnected(self) -> None:
        """Off the broker: what it said is forgotten, and read again from its retained records
        on the next join (a node that died meanwhile is then simply absent)."""
        self._synced_at = None
        self.nodes.clear()
        self.claims.clear()
        self._orphans.clear()

    def rejoined(self, now: float) -> Rejoin:
        """Every retained record has been read (the node's barrier came back): reconcile."""
        self._synced_at = now
        reclaim, yielded = [], []
        for device in sorted(self.local):
            claim, own = self.claims.get(device), self.own.get(device)
            if claim is None or (own is not None and claim.rank < own.rank):
                reclaim.append(device)
            elif own is None or claim.rank > own.rank:
                yielded.append(device)
        for device in yielded:
            self.forget(device)
        release = sorted(d for d, c in self.claims.items()
                         if self.mine(c) and c.serving and d not in self.local)
        return Rejoin(reclaim, yielded, release)

    # ---- records from the broker ----------------------------------------------------------

    def on_presence(self, node: str, presence: Presence | None) -> None:
        if presence is None or presence.node != node:
            self.nodes.pop(node, None)
        elif node in self.nodes or len(self.nodes) < MAX_NODES:
            self.nodes[node] = presence

    def on_claim(self, device: str, claim: Claim | None) -> Verdict:
        """A device's owner record. Nodes that claim one device at once keep the best-ranked
        claim, each on its own, whatever order the claims reach them in: one node serves it."""
        self._orphans.pop(device, None)
        if not self.synced:  # still reading the retained records: ``rejoined`` decides
            self._store(device, claim)
            return Verdict.KEEP
        if claim is None:
            self.claims.pop(device, None)
            return Verdict.RECLAIM if device in self.local else Verdict.KEEP
        known = [c for c in (self.claims.get(device), self.own.get(device)) if c is not None]
        best = max(known, key=lambda c: c.rank, default=None)
        if best is not None and claim.rank < best.rank:  # outranked: it changes nothing
            held = self.own.get(device)
            return Verdict.REASSERT if held is not None and best == held else Verdict.KEEP
        self._store(device, claim)
        held = self.own.get(device)
        if held is None or claim.token == held.token:
            return Verdict.KEEP
        self.forget(device)
        return Verdict.YIELD

    def _store(self, device: str, claim: Claim | None) -> None:
        if claim is None:
            self.claims.pop(device, None)
        elif device in self.claims or len(self.claims) < self.max_claims:
            self.claims[device] = claim

    # ---- decisions --------------------------------------------------------------------------

    def mine(self, claim: Claim) -> bool:
        return claim.node == self.node and claim.incarnation == self.incarnation

    def live(self, claim: Claim) -> bool:
        """The claim's node is up, in the same process that claimed."""
        presence = self.nodes.get(claim.node)
        return presence is not None and presence.incarnation == claim.incarnation

    def holder(self, device: str) -> Presence | None:
        """The other node serving the device now, if any."""
        claim = self.claims.get(device)
        if claim is None or not claim.serving or self.mine(claim) or not self.live(claim):
            return None
        return self.nodes[claim.node]

    def route(self, device: str, kind: Kind, *, shared: bool, is_start: Callable[[], bool],
              now: float) -> Route:
        """Where a device message goes. ``shared``: it came through the shared subscription
        (else through this node's own subscription of the device's topics); ``is_start`` is
        asked only when it matters."""
        if not self.synced:
            return Route.IGNORE
        if not shared or kind != CONTROL:
            if device not in self.local:
                return Route.IGNORE
            if self.draining and kind == CONTROL and is_start():
                return Route.IGNORE  # a draining node lets a node that stays take the device
            return Route.HANDLE
        if device in self.local:
            return Route.IGNORE  # its own subscription brings the same message
        holder = self.holder(device)
        if holder is not None:
            return Route.TAKE if holder.draining and is_start() else Route.IGNORE
        if not is_start():
            return Route.ANSWER
        assert self._synced_at is not None
        if device not in self.claims and now - self._synced_at < self.settle_s:
            return Route.IGNORE  # just joined: its node may be reconnecting (it repeats the start)
        return Route.TAKE

    def claim(self, device: str) -> Claim:
        """This node takes the device (or claims it again): the record to publish, above every
        claim it knows of for the device."""
        known = [c.epoch for c in (self.claims.get(device), self.own.get(device)) if c]
        claim = Claim(self.node, self.incarnation, uuid.uuid4().hex[:12], max(known, default=0) + 1)
        self.local.add(device)
        self.own[device] = claim
        self._orphans.pop(device, None)
        return claim

    def release(self, device: str) -> Claim | None:
        """The device's session here ended without ending the conversation: the record that
        lets any node take it over (with its conversation); None if this node has no claim."""
        own = self.own.get(device)
        if own is None:
            claim = self.claims.get(device)
            own = claim if claim is not None and self.mine(claim) else None
        self.forget(device)
        return None if own is None else own.released()

    def forget(self, device: str) -> None:
        """This node no longer holds the device (it ended, or another node took it)."""
        self.local.discard(device)
        self.own.pop(device, None)

    def chooser(self, device: str) -> str | None:
        """The live node that looks after a device nobody serves (rendezvous hashing: every node
        picks the same one from the same view, and few devices move when a node comes or goes)."""
        candidates = [n for n, p in self.nodes.items() if not p.draining]
        if not candidates:
            return None
        return max(candidates, key=lambda n: hashlib.blake2b(f"{n}\n{device}".encode(),
                                                             digest_size=8).digest())

    def sweep(self, now: float, forget_after_s: float) -> tuple[list[str], list[str]]:
        """Devices whose node is gone (``prompt``: tell them to start again, once) and records
        nobody took for ``forget_after_s`` (``forget``: clear the owner record and the
        conversation), each decided by the device's chooser only."""
        prompt: list[str] = []
        forget: list[str] = []
        if self._synced_at is None:
            return prompt, forget
        for device, claim in self.claims.items():
            if device in self.local or (claim.serving and self.live(claim)):
                self._orphans.pop(device, None)
                continue
            orphan = self._orphans.get(device)
            if orphan is None or orphan.token != claim.token:
                orphan = self._orphans[device] = _Orphan(now, claim.token)
            if self.chooser(device) != self.node:
                continue
            if (claim.serving and not orphan.prompted
                    and now - max(orphan.since, self._synced_at) >= self.orphan_grace_s):
                orphan.prompted = True
                prompt.append(device)
            if not orphan.forgotten and now - orphan.since >= forget_after_s:
                orphan.forgotten = True
                forget.append(device)
        return prompt, forget
