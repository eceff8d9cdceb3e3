"""IncrementalDetokenizer with the real SmolLM2 tokenizer: deltas, stop strings, hold-back and
multi-byte characters split over several byte tokens."""

from __future__ import annotations

import pytest
from attnserve.engines.detokenizer import IncrementalDetokenizer

REPLACEMENT = "\ufffd"

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower.",
    "I like 🍕 pizza and 🎉 parties, café crème, naïve résumé.",
    "日本語のテキスト and 中文 mixed with English.",
    "Line one\n\nLine two\twith a tab  and  double spaces.",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def stream(tokenizer, token_ids, stop=()) -> tuple[IncrementalDetokenizer, list[str]]:
    """Push every token (stopping when the detokenizer stops); return it and the deltas."""
    detok = IncrementalDetokenizer(tokenizer, stop=stop)
    deltas = []
    for token_id in token_ids:
        deltas.append(detok.push(token_id))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stop", [(), ("@@never@@",)], ids=["no-stop", "unmatched-stop"])
def test_deltas_concatenate_to_the_decoded_text(tokenizer, text, stop):
    ids = tokenizer.encode(text)
    detok, deltas = stream(tokenizer, ids, stop)
    assert "".join(deltas) == text == tokenizer.decode(ids)
    assert detok.text == text
    assert not detok.stopped


def test_without_stop_strings_whole_characters_are_emitted_at_once(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    emitted = ""
    for token_id in tokenizer.encode("Hello world, how are you?"):
        emitted += detok.push(token_id)
        assert emitted == detok.text  # nothing to hold back
    assert detok.flush() == ""


def test_final_push_emits_the_held_back_tail(tokenizer):
    ids = tokenizer.encode("abc def ghi")
    detok = IncrementalDetokenizer(tokenizer, stop=("0123456789",))
    emitted = "".join(detok.push(token_id) for token_id in ids[:-1])
    emitted += detok.push(ids[-1], final=True)
    assert emitted == "abc def ghi"
    assert detok.flush() == ""


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("The answer is 42.\n\nNext question please.", ("\n\n",), "The answer is 42."),
        ("Count: one, two, three, four.", ("three", "two"), "Count: one, "),
        ("Say STOP now and nothing after", ("STOP",), "Say "),
        ("<answer>yes</answer> trailing words", ("</answer>",), "<answer>yes"),
    ],
)
def test_stop_string_truncates_and_stops(tokenizer, text, stop, expected):
    ids = tokenizer.encode(text)
    detok, deltas = stream(tokenizer, ids, stop)
    assert detok.stopped
    assert detok.text == expected
    assert "".join(deltas) == expected
    assert deltas[-1] == ""  # nothing left to flush after a stop


def test_stop_string_inside_one_token(tokenizer):
    # " Paris" is one token; the stop "ari" ends in the middle of it.
    ids = tokenizer.encode("We went to Paris today")
    detok, deltas = stream(tokenizer, ids, ("ari",))
    assert detok.stopped and "".join(deltas) == "We went to P"


def test_pushing_stops_at_the_first_token_that_completes_the_stop(tokenizer):
    ids = tokenizer.encode("alpha beta gamma delta")
    detok = IncrementalDetokenizer(tokenizer, stop=("gamma",))
    for count, token_id in enumerate(ids, start=1):
        detok.push(token_id)
        if detok.stopped:
            break
    assert tokenizer.decode(ids[:count]).endswith("gamma")
    assert not tokenizer.decode(ids[: count - 1]).endswith("gamma")


def test_possible_stop_prefix_is_held_back_until_ruled_out(tokenizer):
    stop = "</answer>"
    text = "Not </ans> nor </answ yet, then </answer> done"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, stop=(stop,))
    emitted = ""
    for token_id in ids:
        emitted += detok.push(token_id)
        if detok.stopped:
            break
        current = detok.text
        assert current.startswith(emitted)
        # No tail of the current text that is a proper prefix of the stop string was emitted.
        for size in range(1, len(stop)):
            if current.endswith(stop[:size]):
                assert len(emitted) <= len(current) - size, (current, emitted)
    assert detok.stopped
    assert emitted == "Not </ans> nor </answ yet, then "
    # The near misses did come out once later text ruled them out, before the stop was seen.


def test_near_miss_is_released_once_it_cannot_start_the_stop(tokenizer):
    ids = tokenizer.encode("a\nb\n\nc")
    assert [tokenizer.decode([i]) for i in ids] == ["a", "\n", "b", "\n", "\n", "c"]
    detok = IncrementalDetokenizer(tokenizer, stop=("\n\n",))
    assert detok.push(ids[0]) + detok.push(ids[1]) == "a"  # the "\n" could start "\n\n"
    assert detok.push(ids[2]) == "\n"  # followed by "b": it cannot
    detok.push(ids[3])
    assert not detok.stopped
    assert detok.push(ids[4]) == ""
    assert detok.stopped and detok.text == "a\nb"
    assert detok.flush() == ""


def test_flush_returns_the_held_back_tail(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=("#####",))
    emitted = "".join(detok.push(token_id) for token_id in tokenizer.encode("Short reply here"))
    tail = detok.flush()
    assert tail  # 4 characters were held back
    assert len(tail) <= 4
    assert emitted + tail == "Short reply here"
    assert detok.flush() == ""


@pytest.mark.parametrize("text", ["🍕", " 🍕🎉", "日本語", "Ωmega ∑ résumé ŧ"])
@pytest.mark.parametrize("stop", [(), ("xyz",)], ids=["no-stop", "stop"])
def test_multibyte_characters_never_emit_the_replacement_character(tokenizer, text, stop):
    ids = tokenizer.encode(text)
    # The text has characters split over byte tokens: some prefix decodes to a replacement char.
    assert any(REPLACEMENT in tokenizer.decode(ids[:n]) for n in range(1, len(ids) + 1))
    detok = IncrementalDetokenizer(tokenizer, stop=stop)
    deltas = [detok.push(token_id) for token_id in ids] + [detok.flush()]
    assert all(REPLACEMENT not in delta for delta in deltas)
    assert "".join(deltas) == text


def test_emoji_split_over_three_tokens_comes_out_whole(tokenizer):
    ids = tokenizer.encode("I like 🍕")
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(token_id) for token_id in ids]
    assert "🍕" in deltas[-1]
    assert deltas[-2] == ""  # the second byte token completes nothing


def test_special_tokens_are_skipped(tokenizer):
    ids = (
        [tokenizer.convert_tokens_to_ids("<|im_start|>")] + tokenizer.encode("hi") + [tokenizer.eos_token_id]
    )
    _, deltas = stream(tokenizer, ids)
    assert "".join(deltas) == "hi"


def test_one_token_completing_two_stops_truncates_at_the_earliest(tokenizer):
    # " world" completes both "ld" and "or" at once; the text must end before the first of them.
    ids = tokenizer.encode("Hello world")
    assert len(ids) == 2
    for stop in [("ld", "or"), ("or", "ld")]:
        detok, deltas = stream(tokenizer, ids, stop)
        assert detok.stopped
        assert "".join(deltas) == detok.text == "Hello w"
