"""Start a voxlens server in a child process on a free loopback port (tests, bench, demos)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

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
