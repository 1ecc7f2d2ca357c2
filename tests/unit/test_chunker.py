import pytest

from pipelines.chunker import Chunker


def chunks_of(text: str, step: int = 3, **kw: int) -> list[str]:
    """Feed ``text`` in small deltas, as an LLM would, and collect every chunk."""
    c = Chunker(**kw)
    out: list[str] = []
    for i in range(0, len(text), step):
        out += c.feed(text[i:i + step])
    return out + c.flush()


def test_first_chunk_is_an_early_clause_then_sentences() -> None:
    text = "Sure, the capital of France is Paris. It is known for the Eiffel Tower. Anything else?"
    assert chunks_of(text) == [
        "Sure,",
        "the capital of France is Paris.",
        "It is known for the Eiffel Tower.",
        "Anything else?",
    ]
    text = "The city, as you may know, is Paris."
    assert chunks_of(text) == ["The city,", "as you may know, is Paris."]


def test_first_chunk_cut_after_a_few_words_but_not_on_a_function_word() -> None:
    assert chunks_of("The capital of France is Paris. Yes.") == [
        "The capital of France", "is Paris.", "Yes."]
    # "the" and "of" cannot end it: the cut moves on to the next content word
    assert chunks_of("I think that the history of Rome is long.")[0] == "I think that the history"
    assert chunks_of("A spider has eight legs.") == ["A spider has eight", "legs."]
    assert chunks_of("Yes it is.") == ["Yes it is."]  # too short to cut


@pytest.mark.parametrize("text", [
    "The value is 3.5 percent of the total.",
    "Ask Dr. Smith about it e.g. tomorrow at 5 p.m. today.",
    "Visit example.com/docs for the details.",
    "It costs $1,299.99 in the U.S. store.",
])
def test_numbers_abbreviations_and_urls_are_not_split(text: str) -> None:
    assert chunks_of(text, step=1, first_words=99) == [text]


def test_no_empty_or_punctuation_only_chunks() -> None:
    out = chunks_of("Hello!!! ... ?  Fine.\n\n\nOK.")
    assert all(any(ch.isalnum() for ch in c) for c in out)
    # nothing speakable is lost; punctuation-only pieces are not sent to TTS
    assert [w for c in out for w in c.split()] == ["Hello!!!", "Fine.", "OK."]
    assert chunks_of("") == []
    assert chunks_of("   \n ") == []


def test_sentence_end_waits_for_the_next_character() -> None:
    c = Chunker(first_words=99)
    assert c.feed("It is 3.") == []  # could be 3.5
    assert c.feed("5 now. And") == ["It is 3.5 now."]
    assert c.flush() == ["And"]


def test_chinese_punctuation_cuts() -> None:
    out = chunks_of("巴黎是法国的首都。它很美丽！你想知道更多吗？", step=2)
    assert out == ["巴黎是法国的首都。", "它很美丽！", "你想知道更多吗？"]


def test_overlong_sentence_is_cut_at_a_space() -> None:
    text = ("word " * 80).strip() + "."
    out = chunks_of(text, max_chars=100, first_words=99)
    assert all(len(c) <= 100 for c in out)
    assert " ".join(out) == text
