"""Mandarin end to end over WebSocket with the default models on a real server (loopback):
real recorded Mandarin in, simplified captions, a Mandarin reply in the Mandarin voice; the
voice follows the language of each reply within one session."""

from __future__ import annotations

from pathlib import Path

from faster_whisper import WhisperModel

from client.common.wavio import read_wav, write_wav
from client.common.ws_client import VoxlensClient
from pipelines.text import HAN, main_script, zh_script
from tests.conftest import ARTIFACTS, Server
from tests.mandarin import cer, hear, pcm_audio


async def test_spoken_mandarin_gets_a_mandarin_answer(server: Server, whisper: WhisperModel,
                                                      zh_speech: list[tuple[Path, str]]) -> None:
    path, said = zh_speech[1]  # a real recording: "一二线城市虽然也处于调整中"
    audio, rate = read_wav(path)
    async with VoxlensClient(server.ws) as client:  # no language set: detected per utterance
        await client.stream_audio(audio, rate, trailing_silence_ms=1500)
        reply = await client.wait_reply(timeout_s=90)
    transcript = reply.transcript or ""
    assert transcript == zh_script(transcript) and HAN.search(transcript), transcript
    assert cer(said, transcript) <= 0.2, transcript
    assert main_script(reply.text) == "han", reply.text
    ARTIFACTS.mkdir(exist_ok=True)
    write_wav(ARTIFACTS / "reply-zh.wav", bytes(reply.audio), client.output_rate)
    heard = hear(whisper, pcm_audio(bytes(reply.audio)), client.output_rate, "zh")
    assert cer(reply.text, heard) <= 0.2, (reply.text, heard)


async def test_the_voice_follows_the_language_of_each_reply(server: Server,
                                                            whisper: WhisperModel) -> None:
    async with VoxlensClient(server.ws) as client:
        await client.say("法国的首都是哪里？")
        zh = await client.wait_reply(timeout_s=90)
        await client.say("What is the capital of Italy?")
        en = await client.wait_reply(timeout_s=90)
    assert "巴黎" in zh.text, zh.text
    heard_zh = hear(whisper, pcm_audio(bytes(zh.audio)), client.output_rate, None)
    assert "巴黎" in heard_zh, heard_zh
    assert "rome" in en.text.lower(), en.text
    heard_en = hear(whisper, pcm_audio(bytes(en.audio)), client.output_rate, None)
    assert "rome" in heard_en.lower() and not HAN.search(heard_en), heard_en
    # each reply's metrics name the time to its first audio, Mandarin as English
    assert zh.metrics["first_audio_sent"] > 0 and en.metrics["first_audio_sent"] > 0
