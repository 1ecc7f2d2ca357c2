"""A real mosquitto broker for the tests: a free 127.0.0.1 port, per-device passwords and the
ACLs of docs/mosquitto.acl (a device may only use its own topics; the nodes alone read their
``$cluster`` records)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

SERVER_USER = "voxlens-server"  # as in docs/mosquitto.acl
DOC_ACL = Path(__file__).resolve().parents[1] / "docs" / "mosquitto.acl"
DEVICES = [f"dev-{k}" for k in range(1, 13)] + ["speaker-1", "speaker-2"]


def mosquitto_binary(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.is_file()), None)
    if found is None:
        raise RuntimeError(f"{name} is missing: run ./run.sh test (it installs Debian mosquitto)")
    return found


class Broker:
    def __init__(self, root: Path, port: int, prefixes: list[str], *,
                 tls: tuple[Path, Path, int] | None = None, nodes: int = 1,
                 devices: list[str] | None = None) -> None:
        """``tls``: (certificate, key, port) of an extra TLS listener on 127.0.0.1; ``nodes``:
        server users per prefix (several nodes sharing it); ``devices``: the device users."""
        self.root, self.port, self.prefixes, self.tls = root, port, prefixes, tls
        # a server per prefix, each its own user (the client id is the username) ...
        self.server_users = {p: SERVER_USER if k == 0 else f"{SERVER_USER}-{k + 1}"
                             for k, p in enumerate(prefixes)}
        # ... and for several nodes on a prefix, one user per node
        self.node_users = {p: [user, *(f"{user}-node{n}" for n in range(2, nodes + 1))]
                           for p, user in self.server_users.items()}
        self.devices = DEVICES if devices is None else devices
        self.passwords = {user: f"pw-{user}" for user in
                          [*(u for users in self.node_users.values() for u in users),
                           *self.devices]}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "mosquitto.log"
        self.config = root / "mosquitto.conf"
        self._write_files()

    def _write_files(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        passwd = self.root / "passwd"
        passwd.unlink(missing_ok=True)
        tool = mosquitto_binary("mosquitto_passwd")
        for k, (user, password) in enumerate(self.passwords.items()):
            subprocess.run([tool, "-b", *(["-c"] if k == 0 else []), str(passwd), user, password],
                           check=True, capture_output=True)
        # the documented ACLs, once per prefix, the server's lines once per node user: what the
        # docs show is what is tested
        lines = [line for line in DOC_ACL.read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
        server = lines[lines.index(f"user {SERVER_USER}") + 1:]
        server = server[:next(k for k, line in enumerate(server) if not line.startswith("topic "))]
        patterns = [line for line in lines if line.startswith("pattern ")]
        acl = [line.replace(" voxlens/", f" {p}/")
               for p in self.prefixes
               for user in self.node_users[p]
               for line in [f"user {user}", *server]]
        acl += [line.replace(" voxlens/", f" {p}/") for p in self.prefixes for line in patterns]
        (self.root / "acl").write_text("\n".join(acl) + "\n")
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous false\n"
            f"password_file {passwd}\nacl_file {self.root / 'acl'}\npersistence false\n"
            f"use_username_as_clientid true\nmax_packet_size 13000000\n"
            f"queue_qos0_messages false\nmax_queued_messages 200\n"
            f"user root\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
            f"log_type information\nlog_timestamp_format %H:%M:%S\n"
            + ("" if self.tls is None else
               f"listener {self.tls[2]} 127.0.0.1\ncertfile {self.tls[0]}\nkeyfile {self.tls[1]}\n"
               "use_username_as_clientid true\n"))

    def url(self, user: str) -> str:
        return f"mqtt://{user}:{self.passwords[user]}@127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([mosquitto_binary("mosquitto"), "-c", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}):\n"
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening in 20 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
