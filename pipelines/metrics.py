"""Prometheus metrics of the compute lanes and of turns (served on ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipelines.scheduling import Priority

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TURN_SECONDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


class ComputeMetrics:
    """One registry per server (tests make their own, so nothing is global)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._wait = Histogram("voxlens_queue_wait_seconds", "Time work waited in its lane",
                               ["lane", "work"], buckets=_SECONDS, registry=r)
        self._run = Histogram("voxlens_run_seconds", "Time a lane spent running one batch",
                              ["lane", "work"], buckets=_SECONDS, registry=r)
        self._batch = Histogram("voxlens_batch_size", "Items run together", ["lane", "work"],
                                buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r)
        self._stale = Counter("voxlens_dropped_stale", "Work superseded or expired unrun",
                              ["lane", "work"], registry=r)
        self._cancelled = Counter("voxlens_cancelled", "Work cancelled before it started",
                                  ["lane", "work"], registry=r)
        self.turn_stage = Histogram("voxlens_turn_stage_seconds", "Turn stages, from the end of "
                                    "the user's speech", ["stage"], buckets=_TURN_SECONDS,
                                    registry=r)
        self.sessions = Gauge("voxlens_sessions", "Open sessions", ["transport"], registry=r)
        self.refused = Counter("voxlens_sessions_refused", "Sessions refused as busy",
                               registry=r)

    def waited(self, lane: str, work: Priority, seconds: float) -> None:
        self._wait.labels(lane, work.name.lower()).observe(seconds)

    def ran(self, lane: str, work: Priority, seconds: float, batch: int) -> None:
        self._run.labels(lane, work.name.lower()).observe(seconds)
        self._batch.labels(lane, work.name.lower()).observe(batch)

    def stale(self, lane: str, work: Priority) -> None:
        self._stale.labels(lane, work.name.lower()).inc()

    def cancelled(self, lane: str, work: Priority) -> None:
        self._cancelled.labels(lane, work.name.lower()).inc()

    def turn(self, stages: dict[str, float]) -> None:
        for stage, ms in stages.items():
            self.turn_stage.labels(stage).observe(ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
