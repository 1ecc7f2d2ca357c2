"""Start a voxlens server in a child process on a free loopback port (tests, bench, demos);
and a fleet: several of them behind HAProxy with deploy/haproxy.cfg (a source checkout)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Loopback:
    """Something serving voxlens's HTTP and WebSocket on a loopback port."""

    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@dataclass
class ServerProcess(Loopback):
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        """Stop at once (SIGINT; SIGTERM would drain: wait for the sessions to end)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _healthy(port: int, netns: str | None) -> bool:
    url = f"http://127.0.0.1:{port}/healthz"
    if netns is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False
    probe = f"import urllib.request as u; u.urlopen({url!r}, timeout=2)"
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe],
                          capture_output=True).returncode == 0


def spawn(args: list[str], log: Path, *, env: dict[str, str] | None = None,
          netns: str | None = None, timeout_s: float = 180,
          port: int | None = None) -> ServerProcess:
    """Run ``python <args>`` with VOXLENS_SERVER__PORT set to ``port`` (default: a free
    port); wait for /healthz. With ``netns`` the server runs inside that network namespace
    (``ip netns``)."""
    port = port or free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "VOXLENS_SERVER__HOST": "127.0.0.1",
                "VOXLENS_SERVER__PORT": str(port), **(env or {})}
    prefix = ["ip", "netns", "exec", netns] if netns else []
    with log.open("wb") as out:
        proc = subprocess.Popen([*prefix, sys.executable, *args], env=full_env, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _healthy(port, netns):
            return ServerProcess(port, proc, log)
        try:  # wait a little, noticing at once if the server died
            proc.wait(timeout=0.3)
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"server exited early ({proc.returncode}):\n"
                           f"{log.read_text(errors='replace')[-3000:]}")
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout_s:.0f} s:\n"
                       f"{log.read_text(errors='replace')[-3000:]}")


def spawn_server(log: Path, *, env: dict[str, str] | None = None, netns: str | None = None,
                 port: int | None = None) -> ServerProcess:
    """``voxlens serve`` with the settings from the environment (plus ``env``)."""
    return spawn(["-m", "server.cli", "serve"], log, env=env, netns=netns, port=port)


# ---- several nodes behind HAProxy (docs/DEPLOYMENT.md) ----------------------------------------

HAPROXY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy.cfg"


def haproxy_binary() -> str:
    """The haproxy program (Debian's package puts it in /usr/sbin, often not on PATH)."""
    found = shutil.which("haproxy") or next(
        (str(p) for p in (Path("/usr/sbin/haproxy"), Path("/usr/bin/haproxy")) if p.is_file()), None)
    if found is None:
        raise RuntimeError("haproxy is missing: run ./run.sh test (it installs Debian haproxy)")
    return found


@dataclass
class Balancer(Loopback):
    """One HAProxy process running deploy/haproxy.cfg on free loopback ports; owns the process."""

    stats_port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def status(self) -> dict[str, str]:
        """HAProxy's view of each node (UP, DOWN …) by server name, from its stats page."""
        url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        with urllib.request.urlopen(url, timeout=5) as r:
            rows = csv.DictReader(io.StringIO(r.read().decode().lstrip("# ")))
            return {row["svname"]: row["status"] for row in rows if row["pxname"] == "nodes"}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def spawn_balancer(nodes: list[ServerProcess], log: Path, *, timeout_s: float = 90) -> Balancer:
    """HAProxy with deploy/haproxy.cfg (its addresses from the environment, as in production)
    in front of one or two nodes; returns once its health checks see every node UP. The file
    names two servers: with one node, both name it."""
    if not 1 <= len(nodes) <= 2:
        raise ValueError(f"deploy/haproxy.cfg balances one or two nodes, not {len(nodes)}")
    addresses = [f"127.0.0.1:{node.port}" for node in nodes] * (3 - len(nodes))
    port, stats_port = free_port(), free_port()
    env = {**os.environ, "VOXLENS_LB_BIND": f"127.0.0.1:{port}",
           "VOXLENS_LB_STATS": f"127.0.0.1:{stats_port}",
           "VOXLENS_NODE1": addresses[0], "VOXLENS_NODE2": addresses[1]}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(HAPROXY_CONFIG)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    balancer = Balancer(port, stats_port, proc, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited ({proc.returncode}):\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            if set(balancer.status().values()) == {"UP"}:
                return balancer
        except OSError:  # still starting
            pass
        time.sleep(0.2)
    balancer.stop()
    raise RuntimeError(f"haproxy did not see every node UP in {timeout_s:.0f} s:\n"
                       f"{log.read_text(errors='replace')[-3000:]}")


@dataclass
class Fleet:
    """Session nodes (``voxlens serve`` processes) and the balancer in front of them."""

    nodes: list[ServerProcess]
    balancer: Balancer

    @property
    def http(self) -> str:
        return self.balancer.http

    @property
    def ws(self) -> str:
        return self.balancer.ws

    def status(self) -> dict[str, str]:
        return self.balancer.status()

    def stop(self) -> None:
        """Stop the balancer, then every node still running, at once (no drain)."""
        self.balancer.stop()
        for node in self.nodes:
            if node.proc.poll() is None:
                node.stop()


def spawn_fleet(count: int, log_dir: Path, *, env: dict[str, str] | None = None) -> Fleet:
    """``count`` nodes (1 or 2) with the same settings (``env``), started side by side, behind
    HAProxy; logs in ``log_dir`` (server-node1.log …, haproxy.log)."""
    if not 1 <= count <= 2:
        raise ValueError(f"deploy/haproxy.cfg balances one or two nodes, not {count}")
    with ThreadPoolExecutor(count) as pool:
        starts = [pool.submit(spawn_server, log_dir / f"server-node{i}.log", env=env)
                  for i in range(1, count + 1)]
    nodes = [start.result() for start in starts if start.exception() is None]
    try:
        failed = next((start.exception() for start in starts if start.exception() is not None),
                      None)
        if failed is not None:
            raise failed
        return Fleet(nodes, spawn_balancer(nodes, log_dir / "haproxy.log"))
    except BaseException:
        for node in nodes:
            node.stop()
        raise
