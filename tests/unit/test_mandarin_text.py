"""Every text rule on Chinese, which has no spaces: script runs, the chunker, barge-in's word
rules, endpointing, the voice chosen per chunk, and script conversion."""

from __future__ import annotations

import pytest

from pipelines.bargein import (
    BargeInConfig,
    content_words,
    endpoint_silence_ms,
    heard_text,
    is_backchannel,
    is_echo,
    said_between,
)
from pipelines.chunker import Chunker
from pipelines.compute import Priority
from pipelines.engines.fakes import FakeTts
from pipelines.text import main_script, script_runs, words, zh_script
from pipelines.turn import SpokenChunk
from pipelines.voices import Voices

CFG = BargeInConfig()
ENDPOINT = {"question_ms": 350, "normal_ms": 500, "incomplete_ms": 1100}


def chunks_of(text: str, step: int = 2) -> list[str]:
    c = Chunker()
    out: list[str] = []
    for i in range(0, len(text), step):
        out += c.feed(text[i:i + step])
    return out + c.flush()


def test_script_runs_keep_every_character_and_cut_where_the_script_changes() -> None:
    text = "我喜欢用Python 3写代码。"
    runs = script_runs(text)
    assert runs == [("han", "我喜欢用"), ("latin", "Python 3"), ("han", "写代码。")]
    assert "".join(r for _, r in runs) == text
    assert script_runs("3.5") == [(None, "3.5")]
    assert main_script("我喜欢用Python写代码") == "han"
    assert main_script("I like 猫") == "latin"


def test_words_count_one_per_chinese_character_and_keep_latin_words_whole() -> None:
    assert words("我喜欢用Python写代码！") == ["我", "喜", "欢", "用", "python", "写", "代", "码"]
    assert words("等一下，停") == ["等", "一", "下", "停"]


def test_chinese_first_chunk_comes_after_a_few_characters_then_sentences() -> None:
    assert chunks_of("北京是中国的首都，人口超过两千万。它很大。") == [
        "北京是中国的首都，", "人口超过两千万。", "它很大。"]
    # no clause mark: cut after a particle once eight characters are there
    first = chunks_of("今天天气很好我们去公园散步吧然后一起吃饭。")[0]
    assert first == "今天天气很好我们去公园散步吧"
    # a Latin word or a number inside is never split
    assert chunks_of("我喜欢用Python写代码。") == ["我喜欢用Python写代码。"]
    assert chunks_of("价格是3.14元，很便宜。") == ["价格是3.14元，", "很便宜。"]


def test_a_long_chinese_sentence_is_cut_at_its_last_clause_mark() -> None:
    long = "，".join(["这是一个很长的句子"] * 8) + "。"
    out = chunks_of(long)
    assert len(out) > 2 and "".join(out) == long and all(len(c) <= 70 for c in out)


def test_chinese_backchannels_do_not_interrupt_and_real_words_do() -> None:
    for text in ["嗯", "嗯嗯。", "对对对", "好的好的", "嗯，对", "是的"]:
        assert is_backchannel(text, "zh", CFG), text
        assert content_words(text, "zh", "", CFG) == 0
    for text in ["等一下，停", "停", "不对", "等等"]:
        assert not is_backchannel(text, "zh", CFG), text
        assert content_words(text, "zh", "巴黎是法国的首都。", CFG) >= CFG.min_words


def test_chinese_echo_is_recognised_by_character_pairs_in_order() -> None:
    reply = "法国的首都是巴黎，它以埃菲尔铁塔闻名。"
    assert is_echo("首都是巴黎", reply, CFG)
    assert is_echo("它以埃菲尔铁塔", reply, CFG)
    # the same characters in another order, or a new question, are the person
    assert not is_echo("巴黎是哪个国家的首都", reply, CFG)
    assert not is_echo("等一下，停", reply, CFG)


def test_heard_text_cuts_chinese_at_a_character() -> None:
    spoken = [SpokenChunk("北京是中国的首都，", 1800.0), SpokenChunk("人口超过两千万。", 1600.0)]
    assert heard_text(spoken, 1800) == "北京是中国的首都，"
    # a quarter into the second chunk: two of its eight characters
    assert heard_text(spoken, 1800 + 400) == "北京是中国的首都，人口"
    assert heard_text(spoken, 1000) == "北京是中国"
    assert heard_text(spoken, 0) == ""
    mixed = [SpokenChunk("我喜欢用Python写代码。", 1500.0)]
    assert heard_text(mixed, 750) == "我喜欢用"  # a Latin word is heard whole or not at all
    assert heard_text(mixed, 1100) == "我喜欢用Python"


def test_said_between_gives_the_characters_of_a_stretch() -> None:
    spoken = [SpokenChunk("北京是中国的首都，", 1800.0), SpokenChunk("人口超过两千万。", 1600.0)]
    assert said_between(spoken, 1900, 2300) == "人口超"
    assert said_between(spoken, 0, 590) == "北京是"


@pytest.mark.parametrize(("text", "expected"), [
    ("法国的首都是哪里？", 350),
    ("法国的首都是哪里", 350),  # no question mark, but a question word at the end
    ("你会说中文吗", 350),
    ("我想问一下，", 1100),
    ("我想去北京然后", 1100),
    ("嗯", 1100),
    ("因为", 1100),
    ("今天天气很好。", 500),
    ("蜘蛛有几条腿。", 350),  # Whisper's full stop after a question: the question word says it
    ("水在多少度的时候沸腾", 350),
    ("甚至出现交易几乎停滞的情况", 500),  # 几乎 "almost" asks nothing
])
def test_mandarin_endpoint_silence(text: str, expected: int) -> None:
    assert endpoint_silence_ms(text, **ENDPOINT) == expected


def test_each_run_goes_to_the_voice_of_its_script() -> None:
    en, zh = FakeTts(22_050), FakeTts(24_000)
    voices = Voices({"en": en, "zh": zh}, default="en")
    assert voices.sample_rate == 24_000
    assert voices.plan("我喜欢用Python写代码。", "zh") == [
        ("zh", "我喜欢用"), ("en", "Python"), ("zh", "写代码。")]
    assert voices.plan("The capital is Paris.", None) == [("en", "The capital is Paris.")]
    assert voices.plan("3.5", "zh") == [("zh", "3.5")]
    assert voices.plan("3.5", "en") == [("en", "3.5")]
    # without a Mandarin voice, Chinese text still goes somewhere (never dropped silently)
    assert Voices({"en": en}).plan("你好", "zh") == [("en", "你好")]


async def test_a_mixed_chunk_is_said_by_both_voices_in_order() -> None:
    en, zh = FakeTts(24_000, latency_s=0), FakeTts(24_000, latency_s=0)
    voices = Voices({"en": en, "zh": zh})
    audio = await voices.synthesize("我喜欢用Python写代码。", priority=Priority.TTS_FIRST,
                                    language="zh")
    assert [c[0] for c in zh.calls] == ["我喜欢用", "写代码。"]
    assert [c[0] for c in en.calls] == ["Python"]
    assert audio.size == sum(int(24_000 * 0.06 * len(t)) for t in ["我喜欢用", "Python", "写代码。"])


def test_transcripts_are_converted_to_the_wanted_script() -> None:
    assert zh_script("廣州市的天氣很好") == "广州市的天气很好"
    assert zh_script("广州市的天气很好", "traditional") == "廣州市的天氣很好"
    assert zh_script("Hello.") == "Hello."


def test_whispers_mandarin_inventions_on_short_sounds_are_not_turns() -> None:
    from pipelines.engines.base import AsrResult
    from pipelines.listener import is_hallucination

    assert is_hallucination(AsrResult("谢谢。", "zh", 0.1, -0.3), voiced_ms=400)
    assert is_hallucination(AsrResult("谢谢观看！", "zh", 0.4, -0.5), voiced_ms=2000)
    assert is_hallucination(AsrResult("哈哈" * 8, "zh", 0.1, -0.3), voiced_ms=3000)  # a loop
    # the decoder's own prompt given back (heard over a reply's echo), however confident
    assert is_hallucination(AsrResult("以下是普通话的句子。", "zh", 0.05, -0.2), voiced_ms=2000)
    assert is_hallucination(AsrResult("以下是普通話的句子", "zh", 0.05, -0.2), voiced_ms=2000)
    assert not is_hallucination(AsrResult("谢谢你告诉我。", "zh", 0.05, -0.3), voiced_ms=1500)
    assert not is_hallucination(AsrResult("谢谢。", "zh", 0.05, -0.2), voiced_ms=1500)
